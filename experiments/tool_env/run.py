"""Distil vs RL on the calculator Env (issue 29), from the same tiny random student.

1. A tiny teacher learns by SFT on tool-using transcripts: "<calc>a * b</calc>" -> tool "a * b = c"
   -> "The answer is c." (the whole transcript is its target: it is the teacher).
2. `opd distill` (the teacher scores whole episodes; the loss counts the student's tokens only) and
   `opd rl` (the Env's reward, no teacher) run from the same student; eval runs the Env too.
   OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/tool_env/run.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch

from opd.config import LossConfig, OptimConfig, TaskConfig, TinyModelConfig, load_config
from opd.learner.learner import Learner
from opd.loop import train
from opd.rollouts import sequence_batch
from opd.run_dir import read_metrics
from opd.tasks import make_records
from opd.tiny import build_tiny_model, build_tiny_tokenizer

TASK = {"digits": 2, "operations": 1, "operators": "*"}


def transcript(record):
    expression = record["completion"].split(" = ")[0]
    answer = record["answer"]
    return record["messages"] + [{"role": "assistant", "content": f"<calc>{expression}</calc>"},
                                 {"role": "tool", "content": f"{expression} = {answer}"},
                                 {"role": "assistant", "content": f"The answer is {answer}."}]


def sft_teacher(out: Path, steps: int = 400) -> Path:
    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    model = build_tiny_model(TinyModelConfig(hidden_size=64, seed=2), tok)
    records = make_records(TaskConfig(name="arithmetic", arithmetic=TASK, train_size=2000), "train", 2000)
    seqs, starts = [], []
    for r in records:
        prompt = tok.apply_chat_template(r["messages"], add_generation_prompt=True, return_dict=True)["input_ids"]
        full = tok.apply_chat_template(transcript(r), return_dict=True)["input_ids"]
        seqs.append(list(full)), starts.append(len(prompt))
    learner = Learner(model, OptimConfig(lr=3e-3, warmup_steps=10), LossConfig(), steps, 64, objective="cross_entropy")
    for step in range(steps):
        rows = [(step * 32 + i) % len(seqs) for i in range(32)]
        metrics = learner.train_step(sequence_batch([seqs[i] for i in rows], [starts[i] for i in rows], tok.pad_token_id),
                                     None)
        if step % 100 == 0:
            print("sft", step, round(metrics["loss"], 3), flush=True)
    path = out / "teacher"
    learner.save(path, tok)
    return path


STEPS = 300


def run(method: str, teacher: Path, out: Path) -> dict:
    overrides = [f"method={method}", f"run_dir={out / method}", "student.tiny.hidden_size=64", "student.tiny.seed=1",
                 f"teacher.path={teacher}", "task.name=arithmetic", "task.arithmetic.digits=2",
                 "task.arithmetic.operations=1", "task.arithmetic.operators=\"*\"", "task.eval_size=32",
                 "env.class=calculator", "env.max_turns=3", "env.max_tokens=64", "sampling.max_new_tokens=20",
                 "sampling.samples_per_prompt=4", "train.prompts_per_step=8", "train.micro_batch_size=32",
                 f"train.steps={STEPS}", "optim.lr=3e-3", "optim.warmup_steps=2", f"eval.every={STEPS // 3}",
                 "log.progress=false", "log.tensorboard=false", "checkpoint.every=0"]
    if method == "distill":
        overrides += ["loss.kind=reverse_kl"]  # the exact reverse KL per sampled position (same tokenizer)
    if method == "rl":
        overrides += ["loss.kl_coef=0"]  # plain RL: the Env's reward only (the teacher only measures KL at eval)
    train(load_config(None, overrides))
    return [r for r in read_metrics(out / method / "metrics.jsonl") if "eval/accuracy" in r]


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tool_env")
    out.mkdir(parents=True, exist_ok=True)
    teacher = out / "teacher" if (out / "teacher").exists() else sft_teacher(out)
    keys = ("step", "eval/accuracy", "eval/env/tool_call_rate", "eval/env/turns", "eval/teacher_kl",
            "eval/teacher_accuracy", "eval/env/truncated")
    table = {m: [{k: r.get(k) for k in keys} for r in run(m, teacher, out)] for m in ("distill", "rl")}
    (out / "results.json").write_text(json.dumps(table, indent=1))
    print(json.dumps(table, indent=1))
