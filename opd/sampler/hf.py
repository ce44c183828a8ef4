"""Student sampling with a Hugging Face model in process: a KV-cached decode loop.

We run the decode loop ourselves instead of `generate()` because the estimator depends on sampling
from exactly the distribution we record: `generate()` fills unset sampling options from the
model's own generation config (a checkpoint shipping top_p=0.9 would silently bias the KL
estimate). Here the sampled distribution and the behaviour log-probs come from the same logits.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F

from opd.config import SamplingConfig
from opd.models import eos_token_ids, merged_weights
from opd.rollouts import Rollouts
from opd.sampler.decoder import choose_decoder


class BiasedSamplingWarning(UserWarning):
    pass


def warn_if_biased(cfg: SamplingConfig) -> None:
    if cfg.temperature != 1.0 or cfg.top_p < 1.0 or cfg.top_k > 0:
        warnings.warn(
            f"sampling with temperature={cfg.temperature}, top_p={cfg.top_p}, top_k={cfg.top_k}: the student is "
            "trained on its temperature-1 distribution, so samples from a different one bias the KL estimate "
            "and the policy gradient. Use temperature=1, top_p=1, top_k=0 unless you mean it.",
            BiasedSamplingWarning, stacklevel=2)


def sampling_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Apply temperature, top-k and top-p to fp32 logits (B x V); identity by default."""
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from B x V probabilities, by inverting each row's cumulative sum at a
    uniform draw (one random number per row: cheaper than torch.multinomial on a CPU). A token of
    probability 0 is never drawn: its cumulative sum equals its predecessor's."""
    cumulative = probs.cumsum(-1)
    uniform = torch.rand(probs.shape[0], 1, device=probs.device, generator=generator) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, uniform, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


class HFSampler:
    """The student's sampler in process (`opd.roles.Sampler`). By default it shares the learner's
    model, so the weights it samples from are always the learner's current ones. It samples from a
    copy of the model, which `sync_weights` updates after every step, with `own_copy=True`
    (sampling ahead, train.max_staleness > 0: the next batches are sampled while the learner
    changes its weights) or a `dtype` other than the model's (sampling.dtype=bfloat16). A LoRA
    student's copy has its adapter merged into plain linear layers: the same policy, decoded with
    one product per layer instead of three (W x rather than W x + s B(A x)), which the lean decoder
    can join and pack in bf16 (SmolLM2-135M under LoRA r16: 12.5 vs 7.5 s for 32 x 64 tokens)."""

    def __init__(self, model, tokenizer, cfg: SamplingConfig, own_copy: bool = False,
                 dtype: torch.dtype | None = None):
        self.learner_model = model
        if dtype == next(model.parameters()).dtype:
            dtype = None
        self.model = model
        if own_copy or dtype is not None:
            self.model = copy.deepcopy(model)
            if hasattr(self.model, "merge_and_unload"):  # LoRA (peft)
                self.model = self.model.merge_and_unload()
            if dtype is not None:
                self.model.to(dtype)
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id
        # the lean Llama-family decoder where it reproduces this model's logits, else the model's own
        # forward: chosen at the first sample (when sharded weights are gathered, under FSDP2)
        self.decoder_class, self.lean_unsupported = None, None
        warn_if_biased(cfg)

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Copy the learner's weights (a LoRA adapter merged) into the sampler's own copy, in its
        dtype; nothing to do when the model is shared."""
        if self.model is not self.learner_model:
            self.model.load_state_dict(merged_weights(self.learner_model))

    def close(self) -> None:
        pass

    @torch.no_grad()
    def sample(self, prompt_ids: list[list[int]], samples_per_prompt: int | None = None,
               max_new_tokens: int | None = None, prompts: list | None = None, greedy: bool = False,
               seed: int | None = None) -> Rollouts:
        """Sample `samples_per_prompt` completions for each prompt (token ids, unpadded).
        `greedy` takes the most likely token instead (for evaluation; not a sample of the policy).
        `seed`: draw from a generator of its own (sampling in a background thread must not share
        torch's global one with training); None: torch's global generator."""
        cfg = self.cfg
        group_size = samples_per_prompt or cfg.samples_per_prompt
        max_new = max_new_tokens or cfg.max_new_tokens
        device = next(self.model.parameters()).device
        generator = None if seed is None else torch.Generator(device).manual_seed(seed)

        rows = [ids for ids in prompt_ids for _ in range(group_size)]
        group_ids = torch.arange(len(prompt_ids), device=device).repeat_interleave(group_size)
        width = max(len(ids) for ids in rows)
        prompt_tokens = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=device)
        prompt_mask = torch.zeros_like(prompt_tokens)
        for i, ids in enumerate(rows):  # left padding: every completion starts at column `width`
            prompt_tokens[i, width - len(ids):] = torch.tensor(ids, device=device)
            prompt_mask[i, width - len(ids):] = 1

        was_training = self.model.training
        self.model.eval()
        try:
            new_tokens, logprobs, entropy, lengths, finished = self._decode(prompt_tokens, prompt_mask, max_new, greedy,
                                                                        generator, group_size)
        finally:
            self.model.train(was_training)

        batch, steps = new_tokens.shape
        completion_mask = (torch.arange(steps, device=device)[None] < lengths[:, None]).float()
        pad = torch.zeros(batch, width, device=device)
        return Rollouts(
            tokens=torch.cat([prompt_tokens, new_tokens], 1),
            attention_mask=torch.cat([prompt_mask, torch.ones_like(new_tokens)], 1),
            completion_mask=torch.cat([pad, completion_mask], 1),
            behaviour_logprobs=torch.cat([pad, logprobs * completion_mask], 1),
            entropy=torch.cat([pad, entropy * completion_mask], 1),
            truncated=~finished,
            group_ids=group_ids,
            prompt_width=width,
            prompts=list(prompts) if prompts is not None else [],
        )

    def _decode(self, tokens, mask, max_new, greedy=False, generator=None, group_size=1):
        """New tokens, their log-probs and entropies (B x steps); each row's length, and whether
        it ended by EOS or a stop string (rather than by running out of tokens). The rows come in
        groups of `group_size` copies of one prompt."""
        batch = tokens.shape[0]
        device = tokens.device
        eos = torch.tensor(self.eos_ids, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        lengths = torch.full((batch,), max_new, dtype=torch.long, device=device)
        out_tokens, out_logprobs, out_entropy = [], [], []

        if self.decoder_class is None:
            self.decoder_class, self.lean_unsupported = choose_decoder(self.model, len(self.tokenizer))
        decoder = self.decoder_class(self.model, tokens, mask, max_new, group_size)
        logits = decoder.prefill()
        for step in range(max_new):
            logprobs_V = F.log_softmax(logits, -1)
            if greedy:
                token = logits.argmax(-1)
            else:
                token = draw(F.softmax(sampling_logits(logits, self.cfg), -1), generator)
            token = torch.where(done, torch.full_like(token, self.pad_id), token)
            out_tokens.append(token)
            out_logprobs.append(logprobs_V.gather(-1, token[:, None]).squeeze(1))
            out_entropy.append(-(logprobs_V.exp() * logprobs_V).sum(-1))

            ended = ~done & torch.isin(token, eos)
            if self.cfg.stop:
                ended |= ~done & self._hits_stop_string(torch.stack(out_tokens, 1), done)
            lengths = torch.where(ended, step + 1, lengths)
            done |= ended
            if bool(done.all()) or step == max_new - 1:
                break
            logits = decoder.step(token)
        return (torch.stack(out_tokens, 1), torch.stack(out_logprobs, 1), torch.stack(out_entropy, 1), lengths, done)

    def _hits_stop_string(self, generated: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """Rows whose text ends with (or now contains) a stop string; only the tail is decoded,
        since earlier text was checked at earlier steps."""
        longest = max(len(s) for s in self.cfg.stop)
        tail = generated[:, -(longest + 2):].tolist()
        hits = [not d and any(s in self.tokenizer.decode(ids) for s in self.cfg.stop)
                for ids, d in zip(tail, done.tolist())]
        return torch.tensor(hits, device=generated.device)
