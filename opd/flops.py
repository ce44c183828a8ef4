"""Analytic compute accounting, so that methods (on-policy distillation, RL, SFT) can be compared
at equal compute.

Counting rules
--------------
Parameters of a model are split into:

* ``body``: every parameter except lookup tables (the input embedding, and any other
  ``nn.Embedding`` such as learned position embeddings) and the output head; norms and biases
  included. With LoRA (peft) the adapter weights are body parameters.
* ``head``: the output projection. A head tied to the input embedding is counted once, as head.
* ``trainable_body`` / ``trainable_head``: the parameters of each part with ``requires_grad``
  (with LoRA: the adapters are trainable, the frozen base weights are not).
* ``layers`` (decoder layers) and ``attention_dim`` = num_attention_heads * head_dim (query width).

An embedding lookup is a gather: 0 FLOPs. A matmul with W parameters costs 2·W FLOPs per token.

* Forward over ``n`` new positions after a cached prefix of ``p`` positions, logits at ``k`` of them:
  ``2·body·n + 2·head·k + 4·layers·attention_dim·S`` with ``S = Σ_{i=1..n} (p+i)`` (causal
  attention: the i-th new position attends to p+i keys; QK^T and AV cost 2·attention_dim per key
  each).
* Backward: gradients w.r.t. activations cost as much as the forward matmuls
  (``2·body·n + 2·head·k``), attention backward twice its forward (``8·layers·attention_dim·S``),
  and weight gradients ``2·trainable_body·n + 2·trainable_head·k``. So full fine-tuning costs
  ≈ 6·params per token (and 3x the attention forward), LoRA ≈ 4·params.

Per row of a batch, ``length`` is the number of real positions (attention_mask == 1) up to and
including the last completion token (padding after EOS is not processed in an ideal
implementation, even though sampled batches give it attention 1), and ``completions`` is
``completion_mask.sum()``. A row without completion tokens has length 0 and costs nothing.

* Sampling with a KV cache (student or teacher generating): the prompt is prefilled and every
  generated token but the last is fed back, i.e. one causal forward over ``length - 1``
  positions with logits at ``completions`` positions.
* Scoring (teacher prefill) and the training forward: forward over ``length`` positions with
  logits at ``completions`` positions.
* Training: forward + backward over those same positions.

These are idealised counts: real implementations also spend FLOPs on padding, recomputation
(gradient checkpointing), norms/activations/softmax, and sliding-window attention would attend to
fewer keys. They are meant for comparing methods, not for measuring hardware utilisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelCost:
    body: int
    head: int
    trainable_body: int
    trainable_head: int
    layers: int
    attention_dim: int

    @classmethod
    def from_model(cls, model) -> "ModelCost":
        """Counts for a Hugging Face causal LM, possibly wrapped by peft."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head_module = base.get_output_embeddings()
        if head_module is None:
            raise ValueError(f"{type(base).__name__} has no output embeddings: not a causal LM")
        # Identify parameters by object, so a head tied to the input embedding is seen once.
        head_ids = {id(p) for p in head_module.parameters()}
        lookup_ids = {id(p) for p in base.get_input_embeddings().parameters()}
        for module in base.modules():
            if isinstance(module, torch.nn.Embedding):
                lookup_ids.update(id(p) for p in module.parameters())
        lookup_ids -= head_ids

        body = head = trainable_body = trainable_head = 0
        for p in base.parameters():  # shared parameters are yielded once
            if id(p) in head_ids:
                head += p.numel()
                trainable_head += p.numel() if p.requires_grad else 0
            elif id(p) not in lookup_ids:
                body += p.numel()
                trainable_body += p.numel() if p.requires_grad else 0

        config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(body=body, head=head, trainable_body=trainable_body, trainable_head=trainable_head,
                   layers=config.num_hidden_layers, attention_dim=config.num_attention_heads * head_dim)

    @classmethod
    def from_config_dir(cls, directory) -> "ModelCost":
        """Counts for the causal LM that a local directory's config.json describes (all parameters
        frozen, as for a teacher), without its weights: the model is built on the `meta` device."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        model.requires_grad_(False)
        return cls.from_model(model)

    @property
    def params(self) -> int:
        return self.body + self.head

    def _matmuls(self, n: int, logits_at: int) -> int:
        """Forward matmul FLOPs of the weights (body at every position, head at logits positions)."""
        return 2 * self.body * n + 2 * self.head * logits_at

    def _attention(self, n: int, prefix: int) -> int:
        """Forward attention FLOPs: QK^T and AV over the keys each new position sees."""
        keys = n * prefix + n * (n + 1) // 2  # Σ_{i=1..n} (prefix + i)
        return 4 * self.layers * self.attention_dim * keys

    def forward(self, n: int, logits_at: int, prefix: int = 0) -> int:
        return self._matmuls(n, logits_at) + self._attention(n, prefix)

    def backward(self, n: int, logits_at: int, prefix: int = 0) -> int:
        activation_grads = self._matmuls(n, logits_at) + 2 * self._attention(n, prefix)
        weight_grads = 2 * self.trainable_body * n + 2 * self.trainable_head * logits_at
        return activation_grads + weight_grads

    def train(self, n: int, logits_at: int) -> int:
        return self.forward(n, logits_at) + self.backward(n, logits_at)


def row_lengths(rollouts) -> tuple[list[int], list[int]]:
    """(length, completions) per row: real positions up to and including the last completion
    token, and the number of completion tokens."""
    completion = rollouts.loss_mask > 0
    real = rollouts.attention_mask > 0
    width = completion.shape[1]
    has_completion = completion.any(-1)
    # Index of the last completion token: argmax finds the first True of the reversed row.
    last = width - 1 - completion.flip(-1).long().argmax(-1)
    upto_last = torch.arange(width, device=completion.device)[None, :] <= last[:, None]
    lengths = ((real & upto_last).sum(-1) * has_completion).tolist()
    return lengths, completion.sum(-1).tolist()


def sampling_flops(cost: ModelCost, rollouts) -> int:
    lengths, completions = row_lengths(rollouts)
    return sum(cost.forward(max(length - 1, 0), k) for length, k in zip(lengths, completions))


def scoring_flops(cost: ModelCost, rollouts) -> int:
    lengths, completions = row_lengths(rollouts)
    return sum(cost.forward(length, k) for length, k in zip(lengths, completions))


def training_flops(cost: ModelCost, rollouts) -> int:
    lengths, completions = row_lengths(rollouts)
    return sum(cost.train(length, k) for length, k in zip(lengths, completions))


def generation_flops(cost: ModelCost, prompt_length: int, completion_length: int) -> int:
    """One sequence sampled with a KV cache (e.g. a teacher writing SFT data)."""
    if completion_length <= 0:
        return 0
    return cost.forward(prompt_length + completion_length - 1, completion_length)
