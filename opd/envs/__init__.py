"""Environments: multi-turn episodes and tool use, with the student trained only on its own tokens.

An Env is message-level and holds one episode's state (a fresh one per episode):

    reset(record) -> messages          the opening conversation (a single turn: record["messages"])
    step(assistant_text) -> StepOutcome(messages to append, done, reward | None)

`opd.envs.episodes.EpisodeSampler` runs many episodes together behind the Sampler contract (one
batched sampling call per turn), renders the environment's messages with the chat template between
the sampled ids (never re-tokenised), and returns one Rollouts whose `loss_mask` is 1 on sampled
tokens only. Built in: `single_turn`, `calculator` (tool use, opd.envs.calculator) and `feedback`
(retry with a hint); a user's Env is `env: {class: module:Name, ...}` in the run config (trusted
code; data records never name classes).
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

from opd.config import ConfigError


@dataclass
class StepOutcome:
    messages: list[dict] = field(default_factory=list)  # appended after the assistant's turn (tool / user)
    done: bool = True
    reward: float | None = None  # per step; an episode's reward is the sum of those given
    tool_calls: int = 0  # how many tool calls this step ran (for the tool-call rate)


@runtime_checkable
class Env(Protocol):
    def reset(self, record: dict) -> list[dict]: ...

    def step(self, assistant_text: str) -> StepOutcome: ...


class SingleTurn:
    """Today's task: one prompt, one completion, graded by the run's grader (reward None)."""

    def __init__(self, **_):
        pass

    def reset(self, record: dict) -> list[dict]:
        return list(record.get("messages") or [])

    def step(self, assistant_text: str) -> StepOutcome:
        return StepOutcome(done=True)


def built_in() -> dict[str, Callable]:
    from opd.envs.calculator import CalculatorEnv
    from opd.envs.feedback import FeedbackEnv
    return {"single_turn": SingleTurn, "calculator": CalculatorEnv, "feedback": FeedbackEnv}


def env_factory(spec: str, args: dict) -> Callable[[], Env]:
    """A function making a fresh Env per episode: a built-in name, or `module:Name` from the run
    config (imported like a user grader, from sys.path and the current directory)."""
    if spec in built_in():
        cls = built_in()[spec]
    elif ":" in spec:
        module_name, _, name = spec.partition(":")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except Exception as err:
            raise ConfigError(f"env.class {spec!r}: cannot import {module_name!r} ({type(err).__name__}: {err})") from None
        cls = getattr(module, name, None)
        if not callable(cls):
            raise ConfigError(f"env.class {spec!r}: module {module_name!r} has no class {name!r}")
    else:
        raise ConfigError(f"env.class {spec!r}: use one of {sorted(built_in())} or module:Name")

    def make() -> Env:
        env = cls(**args)
        if not callable(getattr(env, "reset", None)) or not callable(getattr(env, "step", None)):
            raise ConfigError(f"env.class {spec!r}: an Env needs reset(record) and step(assistant_text)")
        return env
    try:
        make()
    except TypeError as err:  # wrong arguments: say so before any work
        raise ConfigError(f"env.class {spec!r}: {err}") from None
    return make
