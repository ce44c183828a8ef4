import warnings

import pytest
import torch

from helpers import chat_ids, sampler, tiny
from opd.config import SamplingConfig
from opd.sampler.hf import BiasedSamplingWarning, sampling_logits
from opd.teacher.hf import HFTeacher

PROMPTS = ["Describe the garden in a few words.", "Hi", "Write one sentence about the winter sea, please, now."]


@pytest.fixture(scope="module")
def talker():
    """A tiny model pretrained to answer in short sentences ending with EOS."""
    return tiny(hidden=64, seed=2, pretrain_steps=200)


def test_completion_mask_covers_exactly_prompt_end_to_eos(talker):
    model, tok = talker
    torch.manual_seed(0)
    r = sampler(model, tok, samples_per_prompt=4, max_new_tokens=40).sample(chat_ids(tok, PROMPTS))
    assert r.tokens.shape[0] == 12 and r.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert r.completion_mask[:, :r.prompt_width].sum() == 0  # prompt and its padding are never trained
    finished = 0
    for i in range(12):
        length = int(r.completion_lengths[i])
        completion = r.tokens[i, r.prompt_width:].tolist()
        assert r.completion_mask[i, r.prompt_width:r.prompt_width + length].all()
        assert tok.eos_token_id not in completion[:length - 1]  # nothing is kept past the first EOS
        if not r.truncated[i]:
            finished += 1
            assert completion[length - 1] == tok.eos_token_id  # EOS itself is trained
            assert all(t == tok.pad_token_id for t in completion[length:])  # padding after EOS is masked
        assert (r.behaviour_logprobs[i] * (1 - r.completion_mask[i])).abs().sum() == 0
    assert finished >= 10  # the pretrained model does stop


def test_behaviour_logprobs_equal_a_full_prefill_with_left_padding(talker):
    """KV-cached decoding with left padding must give the log-probs a full forward gives (this is
    what the teacher and learner compute): otherwise the importance ratio is not 1 on-policy."""
    model, tok = talker
    torch.manual_seed(1)
    r = sampler(model, tok, samples_per_prompt=3, max_new_tokens=24).sample(chat_ids(tok, PROMPTS))
    rescored = HFTeacher(model, tok, chunk_size=7, micro_batch_size=4).score(r)
    torch.testing.assert_close(rescored.logprobs, r.behaviour_logprobs, atol=2e-4, rtol=1e-4)
    for p in model.parameters():
        p.requires_grad_(True)  # HFTeacher froze the shared module-scoped model


def test_pure_sampling_matches_the_model_distribution():
    model, tok = tiny(hidden=32, seed=3, init_std=0.3)
    prompt = chat_ids(tok, ["Hi"])[0]
    torch.manual_seed(0)
    n = 6000
    r = sampler(model, tok, samples_per_prompt=n, max_new_tokens=1).sample([prompt])
    first = r.tokens[:, r.prompt_width]
    with torch.no_grad():
        probs = model(input_ids=torch.tensor([prompt])).logits[0, -1].softmax(-1)
    counts = torch.bincount(first, minlength=probs.numel()).float() / n
    top = probs.topk(5).indices
    # binomial standard error at n=6000 is below 0.0065; allow 4 of them
    assert (counts[top] - probs[top]).abs().max() < 0.026
    torch.testing.assert_close(r.behaviour_logprobs[:, r.prompt_width], probs.log()[first], atol=1e-5, rtol=1e-5)


def test_biased_sampling_settings_warn_and_defaults_do_not():
    model, tok = tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler(model, tok)
    for kw in ({"temperature": 0.7}, {"top_p": 0.9}, {"top_k": 20}):
        with pytest.warns(BiasedSamplingWarning, match="bias"):
            sampler(model, tok, **kw)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(sampling_logits(logits, SamplingConfig(**kw)))[0].tolist()
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert kept(top_p=0.81) == [True, True, True, False]
    assert kept(top_p=0.4) == [True, False, False, False]  # the top token always stays
    scaled = sampling_logits(logits, SamplingConfig(temperature=2.0))
    torch.testing.assert_close(scaled, logits / 2)


def test_stop_strings_end_the_completion(talker):
    model, tok = talker
    torch.manual_seed(2)
    r = sampler(model, tok, samples_per_prompt=4, max_new_tokens=40, stop=["."]).sample(chat_ids(tok, PROMPTS[:1]))
    for i in range(4):
        length = int(r.completion_lengths[i])
        text = tok.decode(r.tokens[i, r.prompt_width:r.prompt_width + length])
        if not r.truncated[i]:
            assert "." in text and "." not in tok.decode(r.tokens[i, r.prompt_width:r.prompt_width + length - 1])
    assert not r.truncated.all()


def _architectures(tok):
    """Tiny decoders of the Llama family with the variants LeanDecoder handles: Llama (what
    opd's tiny models are), Qwen2 (biases on q/k/v), Qwen3 (q/k norms, fewer key-value heads, a
    head size of its own), and a Llama student under LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    llama, _ = tiny(hidden=32, seed=4, init_std=0.2)
    lora = get_peft_model(tiny(hidden=32, seed=5, init_std=0.2)[0],
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                     init_lora_weights=False))
    qwen2 = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, initializer_range=0.2, **common))
    qwen3 = Qwen3ForCausalLM(Qwen3Config(num_key_value_heads=2, head_dim=16, initializer_range=0.2, **common))
    return {"llama": llama, "llama+lora": lora, "qwen2": qwen2, "qwen3": qwen3}


def test_lean_decoder_samples_what_the_models_own_forward_samples():
    """The same draws through LeanDecoder and through the model's own forward give the same tokens
    and log-probs, on every architecture it accepts; those log-probs are the full prefill's."""
    from opd.sampler.decoder import HFDecoder, LeanDecoder

    _, tok = tiny()
    prompts = chat_ids(tok, PROMPTS)
    for name, model in _architectures(tok).items():
        model.eval()
        results = {}
        for decoder in (LeanDecoder, HFDecoder):
            s = sampler(model, tok, samples_per_prompt=2, max_new_tokens=20)
            s.sample(prompts[:1], samples_per_prompt=1, max_new_tokens=1)  # chooses its decoder
            assert s.decoder_class is LeanDecoder, (name, s.lean_unsupported)
            s.decoder_class = decoder
            results[decoder] = s.sample(prompts, seed=7)
        lean, own = results[LeanDecoder], results[HFDecoder]
        assert torch.equal(lean.tokens, own.tokens), name
        torch.testing.assert_close(lean.behaviour_logprobs, own.behaviour_logprobs, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(lean.entropy, own.entropy, atol=1e-5, rtol=1e-5, msg=name)
        rescored = HFTeacher(model, tok, chunk_size=8).score(lean)
        torch.testing.assert_close(rescored.logprobs, lean.behaviour_logprobs, atol=2e-4, rtol=1e-4, msg=name)


def test_lean_decoder_in_bf16_joins_and_packs_the_plain_products():
    """In bf16 on a CPU the lean decoder applies q/k/v and gate/up as one product each, with the
    weight packed for oneDNN: the joined product equals the modules' own outputs side by side
    (biases included), LoRA modules are still called one by one, and the decoder reproduces the
    bf16 model's forward on every architecture it accepts."""
    from opd.sampler.decoder import LeanDecoder, choose_decoder

    _, tok = tiny()
    for name, model in _architectures(tok).items():
        model = model.to(torch.bfloat16).eval()
        decoder_class, why = choose_decoder(model, len(tok))
        assert decoder_class is LeanDecoder, (name, why)
        ids = torch.tensor([[5, 6, 7, 8]])
        decoder = LeanDecoder(model, ids, torch.ones_like(ids), 2)
        layer = decoder.decoder.layers[0]
        qkv, _, gate_up, _ = decoder.products[0]
        x = torch.randn(3, 1, model.config.hidden_size, dtype=torch.bfloat16)
        attn = layer.self_attn
        expected = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
        torch.testing.assert_close(qkv(x), expected, msg=name)
        torch.testing.assert_close(gate_up(x), torch.cat([layer.mlp.gate_proj(x), layer.mlp.up_proj(x)], -1), msg=name)
        assert (qkv.weight is None) == (name == "llama+lora"), name  # LoRA's q/v are not plain Linears
        assert gate_up.weight is not None, name


def test_one_new_tokens_attention_equals_sdpa_with_grouped_heads_and_padding():
    """The decode step's attention (two products and a softmax) equals PyTorch's SDPA, with fewer
    key-value heads than query heads and left-padded cache columns masked out."""
    from opd.sampler.decoder import attend_one_token

    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 3, 4, 2, 7, 8
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    bias = torch.zeros(batch, 1, 1, length).masked_fill(~valid[:, None, None], float("-inf"))
    q = torch.randn(batch, heads, 1, dim)
    keys, values = torch.randn(batch, kv_heads, length, dim), torch.randn(batch, kv_heads, length, dim)
    expected = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=valid[:, None, None],
                                                                scale=0.3, enable_gqa=True)
    torch.testing.assert_close(attend_one_token(q, keys, values, bias, 0.3), expected)
    keys[1, :, :3] = 1e4  # what the padded columns hold does not matter
    torch.testing.assert_close(attend_one_token(q, keys, values, bias, 0.3), expected)


def test_other_architectures_sample_through_their_own_forward():
    """A decoder LeanDecoder does not know (GPT-2 here) samples through the model's forward, and
    the sampler says why."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from opd.sampler.decoder import HFDecoder

    _, tok = tiny()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    s = sampler(model, tok, samples_per_prompt=2, max_new_tokens=8)
    r = s.sample(chat_ids(tok, PROMPTS))
    assert s.decoder_class is HFDecoder and "gpt2" in s.lean_unsupported
    rescored = HFTeacher(model, tok, chunk_size=8).score(r)
    torch.testing.assert_close(rescored.logprobs, r.behaviour_logprobs, atol=2e-4, rtol=1e-4)


def test_a_lean_decoder_that_disagrees_with_the_model_is_not_used(monkeypatch):
    """The structural check is not trusted alone: a model whose logits the lean forward does not
    reproduce (here, a norm's epsilon it would misread) samples through its own forward."""
    from opd.sampler import decoder

    model, tok = tiny(hidden=32, seed=4, init_std=0.2)
    monkeypatch.setattr(decoder, "_rms_norm", lambda norm, x: torch.nn.functional.rms_norm(
        x, (x.shape[-1],), norm.weight, 0.5))
    s = sampler(model, tok, max_new_tokens=4)
    s.sample(chat_ids(tok, PROMPTS[:1]))
    assert s.decoder_class is decoder.HFDecoder and "differ from the model's forward" in s.lean_unsupported


def test_draw_follows_the_probabilities_and_never_draws_a_zero():
    from opd.sampler.hf import draw

    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0]).repeat(40000, 1)
    tokens = draw(probs, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=5).float() / len(tokens)
    assert counts[1] == 0 and counts[4] == 0
    # binomial standard error at n=40000 is at most 0.0025; allow 4 of them
    torch.testing.assert_close(counts, probs[0], atol=0.01, rtol=0)


def test_a_bf16_model_is_verified_in_fp32_and_given_back_unchanged(monkeypatch):
    """choose_decoder checks the lean forward of a bf16 model on a CPU in fp32 (in bf16 a model
    with massive activations is too ill-conditioned for any tolerance), then restores every
    parameter to its own dtype and bits."""
    from opd.sampler import decoder

    model, tok = tiny(hidden=32, seed=4, init_std=0.2)
    model = model.to(torch.bfloat16).eval()
    before = {name: p.clone() for name, p in model.named_parameters()}
    checked = []
    verify = decoder.lean_matches
    monkeypatch.setattr(decoder, "lean_matches", lambda m, v: checked.append(
        {p.dtype for p in m.parameters()}) or verify(m, v))
    assert decoder.choose_decoder(model, len(tok)) == (decoder.LeanDecoder, None)
    assert checked == [{torch.float32}]
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, before[name]), name
