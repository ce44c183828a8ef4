"""bf16 compute for the learner (train.compute_dtype=bfloat16): matrix products in bf16, everything the
optimizer sees in fp32.

The weights, their gradients and the optimizer's moments stay fp32 (autocast casts a weight to
bf16 for each product); log-softmax and the losses run in fp32 (the head's logits are cast back
before them). Attention stays fp32 on CPU: there, PyTorch's bf16 attention backward is several
times slower than the fp32 one, and attention is a small share of the FLOPs.
"""

from __future__ import annotations

import contextlib

import torch

FP32_ATTENTION = "opd_sdpa_fp32"


def _sdpa_in_fp32(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention with autocast off and its inputs in fp32; its output in the
    query's dtype (bf16 under autocast, or in the sampler's bf16 copy of the model)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(query.dtype), weights


def _register_fp32_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FP32_ATTENTION, _sdpa_in_fp32)
    AttentionMaskInterface.register(FP32_ATTENTION, sdpa_mask)


def prepare(model, dtype: str, device: torch.device) -> None:
    """Check that the model can train under `dtype` autocast; on CPU, switch its attention to SDPA
    in fp32 (the same result as SDPA without autocast, which the sampler sharing the model gets)."""
    if dtype == "float32":
        return
    if dtype != "bfloat16":
        raise ValueError(f"train.compute_dtype={dtype!r}: expected 'float32' or 'bfloat16'")
    weights = {p.dtype for p in model.parameters() if p.requires_grad}
    if weights != {torch.float32}:
        raise ValueError(f"train.compute_dtype=bfloat16 keeps fp32 weights and computes in bf16; the student's trained "
                         f"weights are {sorted(str(d) for d in weights)}: load it in float32 (student.dtype=float32)")
    if device.type == "cpu":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if base.config._attn_implementation == "sdpa":
            _register_fp32_attention()
            base.set_attn_implementation(FP32_ATTENTION)


def context(dtype: str, device: torch.device):
    """The autocast region of a forward pass (a no-op in float32)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
