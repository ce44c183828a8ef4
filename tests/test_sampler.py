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
