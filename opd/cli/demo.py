"""The embedded default run: distil a tiny student from a tiny teacher, both built locally.

For now this is the small end-to-end check of the whole engine (the full demo with RL and SFT
baselines comes later): a 32-wide student trained for 40 steps on the built-in conversations is
distilled, on its own samples, from a 64-wide teacher trained for 300 steps.
"""

from __future__ import annotations

DEMO_CONFIG = {
    "run_dir": "runs/demo",
    "student": {"tiny": {"hidden_size": 32, "num_layers": 2, "seed": 1, "pretrain_steps": 40}},
    "teacher": {"tiny": {"hidden_size": 64, "num_layers": 2, "seed": 2, "pretrain_steps": 300}},
    "sampling": {"samples_per_prompt": 4, "max_new_tokens": 24},
    "loss": {"kind": "sampled_reverse_kl"},
    "optim": {"lr": 3e-3, "warmup_steps": 5, "schedule": "cosine", "min_lr_ratio": 0.1},
    "train": {"steps": 60, "prompts_per_step": 8, "micro_batch_size": 16},
    "eval": {"every": 20},
    "log": {"rollouts_every": 10, "rollouts_per_step": 8},
    "checkpoint": {"every": 20},
}

QUICK_OVERRIDES = ["train.steps=4", "eval.every=2", "checkpoint.every=2", "log.rollouts_every=2",
                   "student.tiny.pretrain_steps=5", "teacher.tiny.pretrain_steps=20", "sampling.max_new_tokens=8"]
