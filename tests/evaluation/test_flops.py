import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opd.flops import (ModelCost, generation_flops, row_lengths, sampling_flops, scoring_flops,
                       training_flops)
from opd.rollouts import Rollouts

# Tiny Llama: vocab 10, hidden 8, intermediate 16, 2 heads of head_dim 8 // 2 = 4, 1 KV head (GQA).
# Per layer:
#   attention: q 8*8 = 64, k 8*4 = 32, v 8*4 = 32, o 8*8 = 64      -> 192
#   mlp:       gate 8*16 = 128, up 8*16 = 128, down 16*8 = 128      -> 384
#   norms:     input + post-attention, 8 each                        ->  16
#   total                                                            -> 592
# Body with 2 layers: 2*592 + final norm 8 = 1192. Head: 10*8 = 80 (embedding table 10*8 not counted).
LAYER = 64 + 32 + 32 + 64 + 3 * 128 + 2 * 8
BODY = 2 * LAYER + 8
HEAD = 10 * 8


def tiny_llama(tied: bool, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("tied", [False, True])
def test_from_model_counts_llama_by_hand(tied):
    cost = ModelCost.from_model(tiny_llama(tied))
    assert BODY == 1192
    # Tied or not, the 10x8 matrix is counted once, as head.
    assert cost == ModelCost(body=1192, head=80, trainable_body=1192, trainable_head=80, layers=2, attention_dim=8)
    assert cost.params == 1272


def test_from_model_one_layer():
    cost = ModelCost.from_model(tiny_llama(tied=False, layers=1))
    assert (cost.body, cost.head, cost.layers, cost.attention_dim) == (592 + 8, 80, 1, 8)


def test_from_model_lora_adapters_are_the_trainable_body():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(tied=False), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    cost = ModelCost.from_model(model)
    # Per layer: q adapter A 8->2 (16) + B 2->8 (16) = 32; v adapter A 8->2 (16) + B 2->4 (8) = 24.
    adapters = 2 * (32 + 24)
    assert adapters == 112
    assert cost == ModelCost(body=1192 + 112, head=80, trainable_body=112, trainable_head=0,
                             layers=2, attention_dim=8)


# A hand-made cost so the arithmetic stays small.
FULL = ModelCost(body=100, head=10, trainable_body=100, trainable_head=10, layers=2, attention_dim=3)
LORA = ModelCost(body=100, head=10, trainable_body=4, trainable_head=0, layers=2, attention_dim=3)


def test_forward_backward_by_hand():
    # n=3 new positions after a prefix of 4, logits at 2: keys 5 + 6 + 7 = 18.
    # matmuls 2*100*3 + 2*10*2 = 640; attention 4*2*3*18 = 432.
    assert FULL.forward(3, 2, prefix=4) == 640 + 432 == 1072
    # backward: activation grads 640, attention 2*432 = 864, weight grads 2*100*3 + 2*10*2 = 640.
    assert FULL.backward(3, 2, prefix=4) == 640 + 864 + 640 == 2144
    # LoRA: weight grads only 2*4*3 = 24.
    assert LORA.backward(3, 2, prefix=4) == 640 + 864 + 24 == 1528
    assert LORA.backward(3, 2, prefix=4) < FULL.backward(3, 2, prefix=4)
    # Without a prefix: keys 1 + 2 + 3 = 6, attention 4*2*3*6 = 144.
    assert FULL.forward(3, 2) == 640 + 144
    assert FULL.forward(0, 0) == 0


def test_full_fine_tuning_is_three_forwards():
    matmuls, attention = 640, 144  # n=3, k=2, no prefix (see above)
    assert FULL.train(3, 2) == 3 * matmuls + 3 * attention == 2352
    assert LORA.train(3, 2) == (640 + 144) + (640 + 288 + 24)
    assert LORA.train(3, 2) < FULL.train(3, 2)


def test_prefix_split_matches_one_pass():
    # Prefill 5 then decode 3 with the cache == one causal pass over 8 positions.
    one_pass = FULL.forward(8, 4)
    assert FULL.forward(5, 1) + FULL.forward(3, 3, prefix=5) == one_pass


def rollouts() -> Rollouts:
    # T = 8, prompt part 3 wide. P = prompt, C = completion, E = EOS, . = padding.
    attention = torch.tensor([
        [0, 1, 1, 1, 1, 1, 1, 1],  # . P P C C E . .  sampled: left padding, attention 1 after EOS
        [1, 1, 1, 1, 1, 1, 1, 1],  # P P P C C C C C  sampled: truncated
        [1, 1, 1, 1, 0, 0, 0, 0],  # P P C E . . . .  SFT-style: right padding with attention 0
        [0, 0, 1, 1, 1, 1, 1, 1],  # . . P . . . . .  no completion tokens
    ])
    completion = torch.tensor([
        [0, 0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ], dtype=torch.float)
    zeros = torch.zeros(4, 8)
    return Rollouts(tokens=torch.zeros(4, 8, dtype=torch.long), attention_mask=attention,
                    completion_mask=completion, behaviour_logprobs=zeros, entropy=zeros,
                    truncated=torch.tensor([False, True, False, False]), group_ids=torch.arange(4), prompt_width=3)


# forward(n, k) with body 100, head 10, 1 layer, attention_dim 2: 200n + 20k + 8*n(n+1)/2.
SMALL = ModelCost(body=100, head=10, trainable_body=100, trainable_head=10, layers=1, attention_dim=2)


def test_row_lengths():
    # Row 0: 5 real positions up to EOS; row 1: 8; row 2: 4; row 3: none.
    assert row_lengths(rollouts()) == ([5, 8, 4, 0], [3, 5, 2, 0])


def test_sampling_flops():
    # Forward over length - 1 positions with logits at the completions:
    # row 0 n=4 k=3: 800 + 60 + 80 = 940; row 1 n=7 k=5: 1400 + 100 + 224 = 1724;
    # row 2 n=3 k=2: 600 + 40 + 48 = 688; row 3: 0.
    assert sampling_flops(SMALL, rollouts()) == 940 + 1724 + 688 == 3352


def test_scoring_and_training_flops():
    # Forward over length positions: row 0 n=5 k=3: 1000 + 60 + 120 = 1180;
    # row 1 n=8 k=5: 1600 + 100 + 288 = 1988; row 2 n=4 k=2: 800 + 40 + 80 = 920.
    assert scoring_flops(SMALL, rollouts()) == 1180 + 1988 + 920 == 4088
    # Full fine-tuning with no prefix: train = 3 x forward.
    assert training_flops(SMALL, rollouts()) == 3 * 4088 == 12264


def test_generation_flops():
    # Prompt 3 + completion 2: forward over 4 positions, logits at 2: 800 + 40 + 80 = 920.
    assert generation_flops(SMALL, 3, 2) == 920
    # Same as sampling row 0 (2 real prompt tokens, 3 completion tokens).
    assert generation_flops(SMALL, 2, 3) == 940
    assert generation_flops(SMALL, 3, 0) == 0
