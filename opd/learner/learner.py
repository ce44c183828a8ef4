"""The learner: one optimizer step on a batch of rollouts, split into micro-batches.

What the step minimises is an objective from `opd.objectives` (the policy gradient for
distillation's sampled estimator and RL, an exact divergence to a local teacher, the top-k forward
KL to a served teacher, cross-entropy on given tokens for SFT and mid-training).
Every micro-batch's loss is divided by the completion-token count of the *whole* batch, so the
accumulated gradient is the same whatever the micro-batch size.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch

from opd.config import LossConfig, OptimConfig
from opd.flops import ModelCost
from opd.learner import autocast, distributed
from opd.learner.checkpoint import load_weights, nonfinite_tensors
from opd import objectives
from opd.losses.chunked import token_divergence, token_logprobs_and_entropy
from opd.models import LogitsHead, merged_weights
from opd.objectives import MicroBatch, objective_of
from opd.roles import TeacherScores
from opd.rollouts import Rollouts


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Linear warm-up to 1, then constant or cosine decay to `min_lr_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Learner:
    """The trained model and its optimizer, in this process (`opd.roles.Learner`)."""

    def __init__(self, model, optim: OptimConfig, loss: LossConfig, total_steps: int, micro_batch_size: int,
                 objective: str | None = None, compute_dtype: str = "float32", device: torch.device | None = None):
        self.objective = objective or objective_of(loss)
        self.objective_impl = objectives.build(self.objective, loss)  # what a step minimises
        self.model = model
        self.head = LogitsHead(model)
        self.output_size = self.head.head.weight.shape[0]
        self.cost = ModelCost.from_model(model)
        self.loss_cfg = loss
        self.micro_batch_size = micro_batch_size
        # train.compute_dtype: the forward passes' products in bf16 (weights and optimizer stay fp32)
        self.compute_dtype = compute_dtype
        autocast.prepare(model, compute_dtype, device or self.device)  # `device`: where a meta model will live
        self.total_steps = total_steps
        self.optim_cfg = optim
        self.rebuild_optimizer()
        # Several processes (opd.learner.distributed.wrap): the DDP or FSDP2 module that runs the
        # decoder, the strategy, and (FSDP2, while a checkpoint is written) the gathered weights.
        self.wrapped = None
        self.strategy: str | None = None
        self.full_state: dict | None = None

    def rebuild_optimizer(self) -> None:
        """A fresh optimizer and schedule over the trainable parameters (again after FSDP2 has
        replaced them with their shards)."""
        optim = self.optim_cfg
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=optim.lr, betas=optim.betas,
                                           weight_decay=optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_multiplier)

    def _lr_multiplier(self, step: int) -> float:
        cfg = self.optim_cfg
        return lr_multiplier(step, cfg.warmup_steps, self.total_steps, cfg.schedule, cfg.min_lr_ratio)

    def verify(self, vocab_size: int) -> None:
        """The chunked head must reproduce the model's own forward before we trust it with gradients."""
        self.head.verify(vocab_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def compute(self):
        """The region of a forward pass and its loss: autocast when train.compute_dtype=bfloat16."""
        return autocast.context(self.compute_dtype, self.device)

    @property
    def exact(self) -> bool:
        """Whether the step needs the teacher's full distribution (hidden states and head)."""
        return self.objective_impl.needs == "full_distribution"

    def train_step(self, rollouts: Rollouts, advantages: torch.Tensor | None,
                   scores: TeacherScores | None = None) -> dict:
        """One optimizer step. The policy gradient needs advantages; the exact losses the
        teacher's hidden states and head, the top-k loss its top-k log-probs (in `scores`);
        cross-entropy needs neither.

        A non-finite loss or gradient (divergence, a bad batch) skips the update: the weights and
        the optimizer's moments stay as they were, and the metrics say `skipped: 1`."""
        self.objective_impl.check(advantages, scores)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        # The completion tokens of the whole optimizer batch: all micro-batches, and all ranks when
        # several processes train (each holds its share of the batch; gradients are summed over them).
        num_tokens = distributed.sum_tensor(rollouts.loss_mask.sum()).clamp(min=1)
        total_loss, sums = 0.0, {}
        micro_batches = list(rollouts.micro_batches(self.micro_batch_size))
        for i, (slot, micro) in enumerate(micro_batches):
            distributed.reduce_gradients_in_this_backward(self, last=i == len(micro_batches) - 1)
            with self.compute():  # float32: a no-op; bfloat16: the products in bf16, the loss in fp32
                _, hidden_M_H = self.head.completion_states(micro)
                loss, micro_sums = self.objective_impl.loss(MicroBatch(
                    rollouts=micro, slot=slot, hidden_M_H=hidden_M_H, logits=self.head.logits,
                    head_parameters=self.head.trainable_parameters(), num_tokens=num_tokens,
                    loss_cfg=self.loss_cfg, advantages=advantages, scores=scores,
                    sharded=distributed.is_sharded(self)))
            loss.backward()
            total_loss += float(loss.detach())
            for name, value in micro_sums.items():
                sums[name] = sums.get(name, 0.0) + value

        if distributed.active():  # each rank summed its share; the metrics are of the whole batch
            names = sorted(sums)
            reduced = distributed.sum_tensor(torch.tensor([total_loss] + [sums[n] for n in names], dtype=torch.float64))
            total_loss, *values = reduced.tolist()
            sums = dict(zip(names, values))

        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip is not None else float("inf")
        grad_norm = distributed.scalar(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        finite = math.isfinite(total_loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            if distributed.is_sharded(self):  # FSDP2: no gradients held while the next batch is sampled
                self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.zero_grad(set_to_none=True)
        # The schedule follows the step count either way, so a skipped step does not shift it.
        self.scheduler.step()

        metrics = {"loss": total_loss, "grad_norm": grad_norm, "lr": lr, "skipped": int(not finite),
                   "grad_clipped": int(finite and self.optim_cfg.grad_clip is not None
                                       and grad_norm > self.optim_cfg.grad_clip)}
        return {**metrics, **self.objective_impl.metrics(total_loss, sums, float(num_tokens))}

    @torch.no_grad()
    def policy_logprobs(self, rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
        """The current policy's log-prob of every completion token and its entropy there (B x T
        each, 0 outside the completion), without gradient: behaviour log-probs recomputed by the
        learner when the sampler's own differ (sampling.recompute_logprobs)."""
        was_training = self.model.training
        self.model.eval()
        logprobs = torch.zeros_like(rollouts.completion_mask)
        entropy = torch.zeros_like(rollouts.completion_mask)
        for slot, micro in rollouts.micro_batches(self.micro_batch_size):
            with self.compute():
                _, states_M_H = self.head.completion_states(micro)
                selected = micro.predicts_completion
                logprobs_M, entropy_M = token_logprobs_and_entropy(self.head.logits, states_M_H,
                                                                   micro.tokens[:, 1:][selected],
                                                                   self.loss_cfg.chunk_size)
            slot.put_predicted(logprobs, logprobs_M, micro)
            slot.put_predicted(entropy, entropy_M, micro)
        self.model.train(was_training)
        return logprobs, entropy

    @torch.no_grad()
    def policy_weights(self) -> dict[str, torch.Tensor]:
        """The policy's weights as a plain Hugging Face checkpoint names them, a LoRA adapter merged
        into its base (W + scale * B @ A) without touching the trained model: what an inference
        engine (the vLLM sampler) loads after each step."""
        if self.full_state is not None:  # FSDP2: the whole weights gathered on rank 0 (full weights only)
            return dict(self.full_state)
        return merged_weights(self.model)

    def export_policy(self, directory: Path, tokenizer, weights_only: bool = False) -> None:
        """A plain Hugging Face directory of the policy (config, tokenizer, merged weights) for an
        inference engine to load; the weights file is replaced atomically. `weights_only`: the
        directory has the rest already (an engine's weight sync after every step)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if not weights_only:
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            config = copy.deepcopy(base.config)
            config.architectures = [type(base).__name__]  # what an engine builds (save_pretrained sets it too)
            config.save_pretrained(directory)
            if getattr(base, "generation_config", None) is not None:  # as the user's checkpoint has it; never obeyed
                base.generation_config.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
        weights, stored = {}, set()
        for name, tensor in self.policy_weights().items():
            if tensor.data_ptr() in stored:  # tied weights (the output head is the embedding) are stored once
                continue
            stored.add(tensor.data_ptr())
            weights[name] = tensor.contiguous()
        partial = directory / "model.safetensors.partial"
        save_file(weights, partial, metadata={"format": "pt"})
        os.replace(partial, directory / "model.safetensors")

    @torch.no_grad()
    def divergence(self, rollouts: Rollouts, scores: TeacherScores, kind: str = "reverse_kl") -> float:
        """Full-vocabulary divergence to the teacher averaged over the completion positions (for
        evaluation: the exact KL beside the sampled estimate)."""
        was_training = self.model.training
        self.model.eval()
        total = 0.0
        for slot, micro in rollouts.micro_batches(self.micro_batch_size):
            with self.compute():
                _, states_M_H = self.head.completion_states(micro)
                div = token_divergence(kind, self.head.logits, states_M_H, scores.logits,
                                       slot.of(scores.hidden)[:, :-1][micro.predicts_completion],
                                       chunk_size=self.loss_cfg.chunk_size)
            total += float(div.sum())
        self.model.train(was_training)
        return total / max(float(rollouts.loss_mask.sum()), 1.0)

    def nonfinite_tensors(self) -> list[str]:
        """Names of the parameters holding a NaN or inf (a checkpoint is never written from them)."""
        if self.full_state is not None:  # FSDP2: the weights gathered for the checkpoint
            return [name for name, t in self.full_state.items()
                    if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        return nonfinite_tensors(self.model)

    # --- weights and state, for checkpoints and exact resume ------------------------------------
    def save(self, directory: Path, tokenizer) -> None:
        """A Hugging Face directory (full weights, or the LoRA adapter) with the tokenizer."""
        if self.full_state is not None:  # FSDP2: the weights gathered on rank 0
            self.model.save_pretrained(directory, state_dict=self.full_state)
        else:
            self.model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    def load_weights(self, directory: Path) -> None:
        if distributed.is_sharded(self):
            distributed.load_sharded_weights(self, directory)
        else:
            load_weights(self.model, directory)

    def state_dict(self) -> dict:
        """Optimizer and schedule state. FSDP2: gathered from every rank (all ranks must call it)."""
        optimizer = distributed.full_optimizer_state(self) if distributed.is_sharded(self) \
            else self.optimizer.state_dict()
        return {"optimizer": optimizer, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the optimizer's moments and the schedule's position; the hyper-parameters are
        this learner's (the config in effect), so `--resume optim.lr=X` trains on at X from the
        resumed step instead of silently keeping the checkpoint's rate."""
        if distributed.is_sharded(self):
            distributed.load_full_optimizer_state(self, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.last_epoch = state["scheduler"]["last_epoch"]
        self.scheduler.base_lrs = [self.optim_cfg.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group.update(initial_lr=self.optim_cfg.lr, betas=self.optim_cfg.betas,
                         weight_decay=self.optim_cfg.weight_decay,
                         lr=self.optim_cfg.lr * self._lr_multiplier(self.scheduler.last_epoch))
