"""Peak memory of the exact reverse-KL loss (forward + backward), chunked vs all positions at once.

    .venv/bin/python benchmarks/chunked_memory.py [--vocab 49152] [--positions 2048] [--hidden 576]

Each setting runs in its own process and reports that process's peak resident memory, so the
figures are comparable within one run (the first row, chunk = all positions, is the baseline).
The shapes default to SmolLM2-135M's head (hidden 576, vocabulary 49152) over 2048 completion
tokens: one fp32 B x T x V logits tensor of that size is 2048 * 49152 * 4 B = 403 MB per model.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def measure(vocab: int, positions: int, hidden: int, chunk: int) -> dict:
    import time

    import torch

    from opd.losses.chunked import token_divergence

    torch.manual_seed(0)
    student_head = torch.nn.Linear(hidden, vocab, bias=False)
    teacher_head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    student_hidden = torch.randn(positions, hidden, requires_grad=True)
    teacher_hidden = torch.randn(positions, hidden)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    kl = token_divergence("reverse_kl", student_head, student_hidden, teacher_head, teacher_hidden,
                          chunk_size=chunk)
    kl.mean().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"chunk": chunk, "peak_mb": peak / 1024, "added_mb": (peak - before) / 1024, "seconds": seconds,
            "loss": float(kl.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--positions", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--chunks", default="0,1024,256,64", help="0 means all positions in one chunk")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.vocab, args.positions, args.hidden, args.child)))
        return

    from rich.console import Console
    from rich.table import Table

    rows = []
    for chunk in [int(c) for c in args.chunks.split(",")]:
        size = chunk or args.positions
        out = subprocess.run([sys.executable, __file__, "--vocab", str(args.vocab), "--positions", str(args.positions),
                              "--hidden", str(args.hidden), "--child", str(size)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    table = Table(title=f"exact reverse KL, forward + backward: {args.positions} positions, vocabulary {args.vocab}, "
                        f"hidden {args.hidden}")
    for col in ("chunk (positions)", "peak RSS MB", "added by the loss MB", "vs all-at-once", "time s", "vs all-at-once"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["chunk"]), f"{r['peak_mb']:.0f}", f"{r['added_mb']:.0f}",
                      f"{r['added_mb'] / base['added_mb']:.2f}x", f"{r['seconds']:.2f}",
                      f"{r['seconds'] / base['seconds']:.2f}x")
    Console().print(table)
    assert all(abs(r["loss"] - base["loss"]) < 1e-3 * max(1.0, abs(base["loss"])) for r in rows), "losses differ"


if __name__ == "__main__":
    main()
