"""Small builders shared by the tests."""

from opd.config import SamplingConfig, TinyModelConfig
from opd.sampler.hf import HFSampler
from opd.tiny import build_tiny_model, build_tiny_tokenizer


def tiny(hidden=32, seed=0, pretrain_steps=0, **kw):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(TinyModelConfig(hidden_size=hidden, seed=seed, pretrain_steps=pretrain_steps, **kw),
                             tokenizer)
    return model, tokenizer


def chat_ids(tokenizer, texts):
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          return_dict=True)["input_ids"] for t in texts]


def sampler(model, tokenizer, **kw):
    return HFSampler(model, tokenizer, SamplingConfig(**kw))
