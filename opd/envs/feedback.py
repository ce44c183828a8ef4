"""A multi-turn feedback Env: a wrong answer gets a user reply ("wrong, try again" with a hint) and
another try, up to `tries`; the reward is the score of the last answer."""

from __future__ import annotations

from opd.envs import StepOutcome
from opd.tasks import grade


class FeedbackEnv:
    def __init__(self, grader: str | None = None, tries: int = 3,
                 message: str = "That is wrong, try again.", **_):
        self.grader, self.tries, self.message = grader, tries, message
        self.record: dict = {}
        self.turn = 0

    def reset(self, record: dict) -> list[dict]:
        self.record, self.turn = record, 0
        return list(record.get("messages") or [])

    def hint(self) -> str:
        answer = str(self.record.get("answer", ""))
        return f" Hint: the answer has {len(answer)} characters." if answer else ""

    def step(self, assistant_text: str) -> StepOutcome:
        self.turn += 1
        score = grade(self.record, assistant_text, self.grader).score
        if score >= 1.0 or self.turn >= self.tries:
            return StepOutcome(done=True, reward=score)
        return StepOutcome([{"role": "user", "content": self.message + self.hint()}], done=False)
