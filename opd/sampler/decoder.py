"""The forward passes of in-process sampling: a prompt, then one new token per row at a time.

Two implementations of one interface (`prefill`, then `step` per new token, each returning the
next-token logits, B x V in fp32):

* `LeanDecoder`, for decoders of the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM, ...): the
  layers' own weights applied directly, a KV cache allocated once for the whole completion, and
  the rotary table computed once. At the sizes we sample on a CPU a decode step is a few dozen
  small matrix products, so the generic forward's per-step bookkeeping (mask building, cache
  objects, output records) cost as much as the products themselves: this decoder does without
  it, and spends fewer operations per step (q/k/v and gate/up joined, in bf16, into one packed
  product each, the output layer packed too; queries and keys rotated together; one token's
  attention as two products).
* `HFDecoder`: the model's own forward with a transformers cache; any architecture.

`choose_decoder` picks the lean one when the model has the expected structure and reproduces the
model's own logits on a small input; otherwise the generic one.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from opd import hardware
from opd.models import LogitsHead, position_ids

LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LAYER_MODULES = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
ATTENTION_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lean_unsupported(model) -> str | None:
    """Why `LeanDecoder` cannot run this model, or None when its structure is the expected one."""
    base = _base(model)
    config = base.config
    if config.model_type not in LEAN_MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {LEAN_MODEL_TYPES}"
    decoder = getattr(base, "model", None)
    if decoder is None or not all(hasattr(decoder, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "no embed_tokens / layers / norm / rotary_emb"
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") == "dynamic":  # its table depends on the length seen so far
        return "dynamic rotary scaling"
    for layer in decoder.layers:
        if {n for n, _ in layer.named_children()} != LAYER_MODULES:
            return f"a decoder layer with modules {sorted(n for n, _ in layer.named_children())}"
        if not {n for n, _ in layer.self_attn.named_children()} <= ATTENTION_MODULES:
            return f"an attention block with modules {sorted(n for n, _ in layer.self_attn.named_children())}"
        if {n for n, _ in layer.mlp.named_children()} - {"act_fn"} != {"gate_proj", "up_proj", "down_proj"}:
            return "an MLP other than gate/up/down"
    return None


def cache_kwarg(model) -> str:
    """The name under which this transformers version takes the KV cache: `cache` from 5.2x on,
    `past_key_values` before (still accepted there, with a deprecation warning)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


class HFDecoder:
    """The model's own forward and cache (any architecture)."""

    def __init__(self, model, tokens: torch.Tensor, mask: torch.Tensor, max_new: int, group_size: int = 1):
        self.model, self.tokens, self.mask = model, tokens, mask  # every row prefilled (group_size unused)
        self.cache_kwarg = cache_kwarg(model)
        self.out = None
        self.next_position = mask.sum(-1, keepdim=True)

    def prefill(self) -> torch.Tensor:
        self.out = self.model(input_ids=self.tokens, attention_mask=self.mask, position_ids=position_ids(self.mask),
                              use_cache=True, logits_to_keep=1)
        return self.out.logits[:, -1].float()

    def step(self, token: torch.Tensor) -> torch.Tensor:
        cache = getattr(self.out, "cache", None)
        cache = cache if cache is not None else self.out.past_key_values
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
        self.out = self.model(input_ids=token[:, None], attention_mask=self.mask, position_ids=self.next_position,
                              use_cache=True, **{self.cache_kwarg: cache})
        self.next_position = self.next_position + 1
        return self.out.logits[:, -1].float()


class _Products:
    """Linear modules of one layer that read the same input, applied as one matrix product where
    they are plain `nn.Linear`s in bf16 on a CPU (q/k/v as one, gate/up as one: a product of 32 rows
    costs little more than its fixed overhead, so three products cost nearly three times one), with
    the joined weight packed once per completion for oneDNN (measured: 20-30% faster products of
    32 rows) where this CPU runs oneDNN's bf16 path (`opd.hardware.bf16_packing`; an AVX2-only CPU
    does not, and then the joined weight is applied by a plain product). This holds one extra bf16
    copy of those weights while a completion is sampled. Other modules (fp32, LoRA, a GPU) are
    called one by one, as the model does. Returns the outputs side by side."""

    def __init__(self, modules: list, rows: int):
        self.modules = modules
        self.weight = self.bias = None
        self.packed = False
        first = modules[0].weight
        if first.device.type == "cpu" and first.dtype == torch.bfloat16 \
                and all(type(m) is torch.nn.Linear for m in modules):
            self.weight = torch.cat([m.weight for m in modules]) if len(modules) > 1 else first
            if any(m.bias is not None for m in modules):
                self.bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
                                       for m in modules])
            self.packed = hardware.bf16_packing()
            if self.packed:
                self.weight = torch.ops.mkldnn._reorder_linear_weight(self.weight, rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        if self.weight is not None:
            return F.linear(x, self.weight, self.bias)
        if len(self.modules) == 1:
            return self.modules[0](x)
        return torch.cat([m(x) for m in self.modules], -1)


class LeanDecoder:
    """A Llama-family forward with a preallocated KV cache (see the module's docstring). Left
    padding is masked out of attention; positions skip it, as in `opd.models.position_ids`.
    `group_size`: the rows come in groups of that many copies of one prompt (a prompt's samples),
    so the prefill runs once per group and its cache is copied to the group's rows (8 prompts x 4
    samples of SmolLM2-135M: 0.3 instead of 1.1 s)."""

    def __init__(self, model, tokens: torch.Tensor, mask: torch.Tensor, max_new: int, group_size: int = 1):
        base = _base(model)
        self.decoder = base.model
        self.head = LogitsHead(model)
        config = base.config
        first = self.decoder.layers[0].self_attn
        self.head_dim = first.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.tokens, self.mask, self.group_size = tokens, mask, group_size
        batch, width = tokens.shape
        total = width + max_new
        weight = self.decoder.embed_tokens.weight
        self.dtype, device = weight.dtype, weight.device
        # A bf16 model attends in fp32 on a CPU: PyTorch's bf16 attention there runs several times
        # slower than its fp32 one (measured: 0.64-0.75 vs 0.15-0.18 ms for a decode step of 32 rows).
        self.attention_dtype = torch.float32 if device.type == "cpu" else self.dtype
        # the rotary table of every position the completion can reach, once
        cos, sin = self.decoder.rotary_emb(weight[:1], torch.arange(total, device=device)[None])
        self.cos, self.sin = cos[0].to(self.attention_dtype), sin[0].to(self.attention_dtype)
        shape = (batch, self.kv_heads, total, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.attention_dtype, device=device) for _ in self.decoder.layers]
        self.values = [torch.zeros(shape, dtype=self.attention_dtype, device=device) for _ in self.decoder.layers]
        # added to a new token's attention scores: -inf on the cache columns that hold no real token
        # (left padding, and the columns not yet filled), 0 on the others
        self.bias = torch.full((batch, 1, 1, total), float("-inf"), dtype=self.attention_dtype, device=device)
        self.bias[..., :width].masked_fill_(mask.bool()[:, None, None], 0.0)
        self.length = 0  # cache columns filled
        self.next_position = mask.sum(-1, keepdim=True)
        head = self.head.head
        self.head_product = _Products([head], batch) if type(head) is torch.nn.Linear else head
        self.products = [(_Products([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], batch),
                          _Products([layer.self_attn.o_proj], batch),
                          _Products([layer.mlp.gate_proj, layer.mlp.up_proj], batch),
                          _Products([layer.mlp.down_proj], batch)) for layer in self.decoder.layers]

    def prefill(self) -> torch.Tensor:
        width = self.tokens.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=self.tokens.device).tril()
        # a padding position attends to itself only: never to nothing (that would be NaN)
        firsts = slice(None, None, self.group_size)  # each group's first row
        mask = self.mask[firsts]
        allowed = (causal & mask.bool()[:, None, None]) | torch.eye(width, dtype=torch.bool, device=mask.device)
        return self._forward(self.tokens[firsts], position_ids(mask), allowed).repeat_interleave(self.group_size, 0)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        self.bias[..., self.length] = 0  # the new token's own column
        logits = self._forward(token[:, None], self.next_position, None)
        self.next_position = self.next_position + 1
        return logits

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """The logits after the last of `ids` (B x new); `allowed`: the prefill's attention mask
        (B x 1 x new x new), None for one new token, which attends to every valid cache column.
        The prefill's rows are each group's first: its keys and values go to all the group's rows."""
        batch, new = ids.shape
        start, self.length = self.length, self.length + new
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]  # B x new x 1 x D
        q_size, k_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        hidden = self.decoder.embed_tokens(ids)
        for layer, (qkv_proj, o_proj, gate_up_proj, down_proj), keys, values in zip(
                self.decoder.layers, self.products, self.keys, self.values):
            attn = layer.self_attn
            qkv = qkv_proj(_rms_norm(layer.input_layernorm, hidden))
            # queries and keys side by side (B x new x heads + kv_heads x D): rotated together
            qk = qkv[..., :q_size + k_size].view(batch, new, self.heads + self.kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3: per-head norms before the rotation
                qk = torch.cat((_rms_norm(attn.q_norm, qk[:, :, :self.heads]),
                                _rms_norm(attn.k_norm, qk[:, :, self.heads:])), 2)
            qk = _rotate(qk.to(self.attention_dtype), cos, sin).transpose(1, 2)
            q, k = qk[:, :self.heads], qk[:, self.heads:]
            v = qkv[..., q_size + k_size:].view(batch, new, self.kv_heads, self.head_dim).transpose(1, 2).to(
                self.attention_dtype)
            if allowed is None:
                keys[:, :, start:self.length], values[:, :, start:self.length] = k, v
                out = attend_one_token(q, keys[:, :, :self.length], values[:, :, :self.length],
                                       self.bias[..., :self.length], attn.scaling)
            else:  # the prefill: the prompt attends to itself; every row of its group caches it
                keys[:, :, :self.length] = k.repeat_interleave(self.group_size, 0)
                values[:, :, :self.length] = v.repeat_interleave(self.group_size, 0)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=attn.scaling,
                                                     enable_gqa=self.kv_heads != self.heads)
            hidden = hidden + o_proj(out.transpose(1, 2).reshape(batch, new, -1).to(self.dtype))
            gate_up = gate_up_proj(_rms_norm(layer.post_attention_layernorm, hidden))
            gate, up = gate_up.chunk(2, -1)
            hidden = hidden + down_proj(F.silu(gate) * up)
        return self.head.finish(self.head_product(_rms_norm(self.decoder.norm, hidden[:, -1])))


def attend_one_token(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """A single new token's attention (q: B x heads x 1 x D; keys, values: B x kv_heads x L x D;
    bias: B x 1 x 1 x L, -inf where a column is not attended) as two batched products and a
    softmax: faster than SDPA's kernel for one query (measured: 10-30% on a decode step of 32
    rows). A key-value head serves `heads / kv_heads` consecutive query heads, as in transformers."""
    batch, heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    q = q.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(scale).add_(bias)
    return torch.matmul(scores.softmax(-1), values).reshape(batch, heads, 1, dim)


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, -1)
    return x * cos + torch.cat((-second, first), -1) * sin


@torch.no_grad()
def lean_matches(model, vocab_size: int, max_new: int = 3) -> str | None:
    """None when `LeanDecoder` reproduces the model's own next-token logits on a small left-padded
    batch (the prompt, then `max_new` steps); else what differed."""
    device = next(model.parameters()).device
    ids = torch.arange(2, 8, device=device).remainder(vocab_size).repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # the second row is left-padded
    decoder = LeanDecoder(model, ids, mask, max_new)
    got = [decoder.prefill()]
    new = torch.arange(max_new, device=device).add(3).remainder(vocab_size)
    for token in new:
        got.append(decoder.step(token.repeat(2)))
    full = torch.cat([ids, new.repeat(2, 1)], 1)
    full_mask = torch.cat([mask, torch.ones(2, max_new, dtype=mask.dtype, device=device)], 1)
    expected = model(input_ids=full, attention_mask=full_mask, position_ids=position_ids(full_mask)).logits.float()
    expected = expected[:, ids.shape[1] - 1:]
    got = torch.stack(got, 1)
    # relative to the largest logit: summing in another order moves a deep model's logits by about
    # 1e-4 of their scale in fp32 (SmolLM2-135M: 0.002 at 34, as the model's own cached decoding
    # does); a wrong forward moves them by their own size
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    difference, scale = float((expected - got).abs().max()), max(1.0, float(expected.abs().max()))
    if not difference <= tol * scale:
        return f"its logits differ from the model's forward by up to {difference:.3g} (largest logit {scale:.3g})"
    return None


def choose_decoder(model, vocab_size: int):
    """LeanDecoder where it is supported and verified on this model, else HFDecoder; and why not.

    A model in a lower precision on a CPU is verified in fp32 (its parameters cast there and back,
    which is exact from bf16 or fp16): in bf16 the comparison is ill-conditioned on a model with
    massive activations. SmolLM2-135M's residual stream reaches 25,000 on the test's first token,
    and its own bf16 forward is 31 off its fp32 logits there, so no tolerance tells a wrong forward
    from rounding (on chat prompts both bf16 forwards are within 1 of the fp32 logits)."""
    why = lean_unsupported(model)
    if why is None:
        was_training = model.training
        upcast = [(p, p.dtype) for p in model.parameters()
                  if p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16)]
        model.eval()
        try:
            for p, _ in upcast:
                p.data = p.data.float()
            why = lean_matches(model, vocab_size)
        finally:
            for p, dtype in upcast:
                p.data = p.data.to(dtype)
            model.train(was_training)
    return (LeanDecoder, None) if why is None else (HFDecoder, why)
