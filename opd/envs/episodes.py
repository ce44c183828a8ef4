"""Many episodes at once behind the Sampler contract: each turn is one batched `sample` call over the
episodes still running, whatever the sampler (HF in process, vLLM colocated or served).

The episode's tokens are [first prompt | sampled turn | environment messages | sampled turn | ...]:
sampled ids are kept as drawn; the environment's messages are the text the chat template adds
after the assistant's turn, tokenised on their own. Limits: `max_turns` sampled turns and
`max_tokens` tokens after the first prompt; an episode that reaches either without finishing is
truncated (counted in env/truncated). When every episode ends after its first turn (a one-turn
Env), the first call's Rollouts are returned as they are: the single-turn path, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from opd.envs import Env, StepOutcome
from opd.rollouts import Rollouts


@dataclass
class Episode:
    env: Env
    prompt_ids: list[int]
    messages: list[dict]
    record: dict
    ids: list[int] = field(default_factory=list)  # after the first prompt
    sampled: list[float] = field(default_factory=list)  # 1 where the student drew the token
    logprobs: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    reward: float | None = None
    done: bool = False
    truncated: bool = False  # reached max_turns or max_tokens unfinished (env/truncated)
    cut: bool = False  # its last turn ran out of tokens (no EOS or stop string)

    def add_reward(self, outcome: StepOutcome) -> None:
        if outcome.reward is not None:
            self.reward = (self.reward or 0.0) + float(outcome.reward)


def render_messages(tokenizer, history: list[dict], assistant_ids: list[int], appended: list[dict]) -> list[int]:
    """The ids of what the chat template writes after the sampled assistant turn: the rest of the
    turn's closing that the sample did not produce (e.g. a newline after EOS, or EOS itself when the
    turn was cut), then the appended messages and the next generation prompt."""
    text = tokenizer.decode(assistant_ids, skip_special_tokens=True)
    conversation = history + [{"role": "assistant", "content": text}]
    opened = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    closed = tokenizer.apply_chat_template(conversation, tokenize=False)
    after = tokenizer.apply_chat_template(conversation + appended, tokenize=False, add_generation_prompt=True)
    if not (closed.startswith(opened) and after.startswith(closed)):
        raise ValueError("the chat template does not render the conversation turn by turn (a later message "
                         "changes earlier text); this Env cannot be rendered with it")
    turn = closed[len(opened):]
    drawn = tokenizer.decode(assistant_ids, skip_special_tokens=False)
    glue = turn[len(drawn):] if turn.startswith(drawn) else ""
    return list(tokenizer(glue + after[len(closed):], add_special_tokens=False).input_ids)


class EpisodeSampler:
    """A Sampler that runs Env episodes with an inner Sampler (opd.roles.Sampler)."""

    def __init__(self, inner, make_env, max_turns: int = 4, max_tokens: int = 512):
        self.inner, self.make_env = inner, make_env
        self.max_turns, self.max_tokens = max_turns, max_tokens
        self.tokenizer = inner.tokenizer

    def __getattr__(self, name):  # device, cfg, ... of the inner sampler
        if name == "inner":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def sync_weights(self) -> None:
        self.inner.sync_weights()

    def close(self) -> None:
        self.inner.close()

    def sample(self, prompt_ids, samples_per_prompt=None, max_new_tokens=None, prompts=None, greedy=False,
               seed=None) -> Rollouts:
        group = samples_per_prompt or self.inner.cfg.samples_per_prompt
        max_new = max_new_tokens or self.inner.cfg.max_new_tokens
        records = [p.record for p in prompts] if prompts else [{} for _ in prompt_ids]
        episodes = []
        for ids, record in zip(prompt_ids, records):
            for _ in range(group):
                env = self.make_env()
                messages = env.reset(record)
                if messages != list(record.get("messages") or []):
                    ids = list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                  tokenize=True, return_dict=True)["input_ids"])
                episodes.append(Episode(env, list(ids), messages, record))
        # turn 1: exactly the single-turn call
        first = self.inner.sample([e.prompt_ids for e in episodes[::group]] if _same_openings(episodes, group)
                                  else [e.prompt_ids for e in episodes],
                                  samples_per_prompt=group if _same_openings(episodes, group) else 1,
                                  max_new_tokens=min(max_new, self.max_tokens), prompts=prompts, greedy=greedy,
                                  seed=seed)
        self._take(episodes, list(range(len(episodes))), first, min(max_new, self.max_tokens))
        if all(e.done for e in episodes) and not any(e.reward is not None for e in episodes) \
                and _same_openings(episodes, group):
            first.env_metrics = self._metrics(episodes)
            return first
        turn = 1
        while turn < self.max_turns and not all(e.done for e in episodes):
            active = [i for i, e in enumerate(episodes) if not e.done]
            budgets = [self.max_tokens - len(episodes[i].ids) for i in active]
            limit = min(max_new, max(budgets))
            out = self.inner.sample([episodes[i].prompt_ids + episodes[i].ids for i in active], samples_per_prompt=1,
                                    max_new_tokens=limit, greedy=greedy,
                                    seed=None if seed is None else seed + turn)
            self._take(episodes, active, out, limit, budgets)
            turn += 1
        for e in episodes:
            if not e.done:
                e.truncated = True
        batch = assemble(episodes, group, self.tokenizer.pad_token_id, prompts, first.tokens.device,
                         entropy=first.entropy is not None)
        batch.env_metrics = self._metrics(episodes)
        return batch

    def _take(self, episodes, active, out: Rollouts, limit: int, budgets=None) -> None:
        """Append each active episode's sampled turn, then the Env's answer to it."""
        for row, i in enumerate(active):
            e = episodes[i]
            keep = out.completion_mask[row].bool()
            ids = out.tokens[row][keep].tolist()
            lps = out.behaviour_logprobs[row][keep].tolist()
            ent = out.entropy[row][keep].tolist() if out.entropy is not None else [0.0] * len(ids)
            budget = budgets[row] if budgets is not None else limit
            cut = len(ids) > budget
            e.cut = cut or bool(out.truncated[row])
            ids, lps, ent = ids[:budget], lps[:budget], ent[:budget]
            e.ids += ids
            e.sampled += [1.0] * len(ids)
            e.logprobs += lps
            e.entropy += ent
            e.turns += 1
            if cut or bool(out.truncated[row]) and len(e.ids) >= self.max_tokens:
                e.done = e.truncated = True
                continue
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            outcome = e.env.step(text)
            e.add_reward(outcome)
            e.tool_calls += outcome.tool_calls
            if outcome.done:
                e.done = True
                continue
            env_ids = render_messages(self.tokenizer, e.messages, ids, outcome.messages)
            e.messages = e.messages + [{"role": "assistant", "content": text}] + outcome.messages
            room = self.max_tokens - len(e.ids)
            e.ids += env_ids[:room]
            e.sampled += [0.0] * len(env_ids[:room])
            e.logprobs += [0.0] * len(env_ids[:room])
            e.entropy += [0.0] * len(env_ids[:room])
            if len(env_ids) >= room:
                e.done = e.truncated = True

    def _metrics(self, episodes) -> dict:
        n = len(episodes)
        return {"env/turns": sum(e.turns for e in episodes) / n,
                "env/tool_call_rate": sum(e.tool_calls > 0 for e in episodes) / n,
                "env/tool_calls": sum(e.tool_calls for e in episodes) / n,
                "env/truncated": sum(e.truncated for e in episodes) / n,
                "env/environment_tokens": sum(len(e.ids) - sum(e.sampled) for e in episodes) / n}


def _same_openings(episodes, group: int) -> bool:
    return all(episodes[i].prompt_ids == episodes[i - i % group].prompt_ids for i in range(len(episodes)))


def assemble(episodes, group: int, pad_id: int, prompts, device, entropy: bool = True) -> Rollouts:
    """Rollouts of finished episodes, laid out as sampled rollouts: [left padding | first prompt |
    conversation | padding]; completion_mask on the conversation, loss_mask on its sampled tokens."""
    width = max(len(e.prompt_ids) for e in episodes)
    steps = max(1, max(len(e.ids) for e in episodes))
    b = len(episodes)
    tokens = torch.full((b, width + steps), pad_id, dtype=torch.long)
    attention = torch.zeros_like(tokens)
    attention[:, width:] = 1
    completion, loss, behaviour, ent = (torch.zeros(b, width + steps) for _ in range(4))
    for i, e in enumerate(episodes):
        tokens[i, width - len(e.prompt_ids):width] = torch.tensor(e.prompt_ids)
        attention[i, width - len(e.prompt_ids):width] = 1
        end = width + len(e.ids)
        tokens[i, width:end] = torch.tensor(e.ids, dtype=torch.long)
        completion[i, width:end] = 1
        loss[i, width:end] = torch.tensor(e.sampled)
        behaviour[i, width:end] = torch.tensor(e.logprobs)
        ent[i, width:end] = torch.tensor(e.entropy)
    rewards = None
    if any(e.reward is not None for e in episodes):
        rewards = torch.tensor([e.reward or 0.0 for e in episodes])
    return Rollouts(tokens=tokens, attention_mask=attention, completion_mask=completion, behaviour_logprobs=behaviour,
                    entropy=ent if entropy else None, truncated=torch.tensor([e.truncated or e.cut for e in episodes]),
                    group_ids=torch.arange(b) // group, prompt_width=width,
                    prompts=list(prompts) if prompts is not None else [], loss_mask=loss,
                    env_rewards=rewards).to(device)
