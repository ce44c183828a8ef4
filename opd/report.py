"""`opd report RUN_DIR`: a self-contained picture of a run, `report.html` plus PNGs in the run dir.

* accuracy vs step and vs FLOPs (every `eval/.../accuracy` curve in metrics.jsonl);
* teacher KL vs step (training samples and evaluation);
* sampled rollouts with every token coloured by its per-token teacher KL, so a reader sees where
  the student forks from the teacher (white: the teacher agrees; red: the teacher would not say it).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

KL_SCALE = 4.0  # nats of per-token KL at which a token is fully red


class ReportError(FileNotFoundError):
    pass


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def kl_colour(kl: float) -> str:
    """White at KL <= 0, red at KL >= KL_SCALE, linear in between (KL estimates can be negative)."""
    strength = min(max(kl / KL_SCALE, 0.0), 1.0)
    fade = round(255 * (1.0 - strength))
    return f"rgb(255,{fade},{fade})"


def coloured_rollout(record: dict) -> str:
    """One completion as HTML spans; each carries its KL as data-kl and as a tooltip."""
    spans = []
    for token, kl in zip(record["tokens"], record["teacher_kl"]):
        spans.append(f'<span class="tok" style="background:{kl_colour(kl)}" data-kl="{kl!r}" '
                     f'title="KL {kl:.3f}">{html.escape(token)}</span>')
    return "".join(spans)


def _plot(path: Path, title: str, xlabel: str, ylabel: str, curves: dict[str, tuple[list, list]]) -> bool:
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _curve(rows: list[dict], x_key: str, y_key: str) -> tuple[list, list]:
    points = [(r[x_key], r[y_key]) for r in rows if r.get(y_key) is not None and r.get(x_key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def build_report(run_dir: str | Path, rollouts_shown: int = 4) -> Path:
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise ReportError(f"{run_dir}: no metrics.jsonl, so this is not a run directory of opd")
    rows = read_jsonl(metrics_path)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}

    accuracy_keys = sorted({k for r in rows for k in r if k.startswith("eval/") and k.endswith("accuracy")
                            and "instruction_accuracy" not in k})
    figures = []
    if _plot(run_dir / "accuracy_vs_step.png", "accuracy vs step", "step", "accuracy",
             {k: _curve(rows, "step", k) for k in accuracy_keys}):
        figures.append("accuracy_vs_step.png")
    if _plot(run_dir / "accuracy_vs_flops.png", "accuracy vs training FLOPs", "FLOPs (student + teacher)",
             "accuracy", {k: _curve(rows, "flops_total", k) for k in accuracy_keys}):
        figures.append("accuracy_vs_flops.png")
    kl_curves = {k: _curve(rows, "step", k) for k in ("teacher_kl", "eval/teacher_kl", "eval/exact_kl")
                 if any(k in r for r in rows)}
    if _plot(run_dir / "teacher_kl_vs_step.png", "teacher KL vs step", "step", "nats per token", kl_curves):
        figures.append("teacher_kl_vs_step.png")

    rollout_files = sorted((run_dir / "rollouts").glob("step_*.jsonl"))
    rollout_html = []
    for path in rollout_files[:1] + rollout_files[-1:] if len(rollout_files) > 1 else rollout_files:
        records = [r for r in read_jsonl(path) if "teacher_kl" in r][:rollouts_shown]
        if not records:
            continue
        items = "".join(
            f'<div class="rollout"><div class="prompt">{html.escape(r.get("prompt") or "")}</div>'
            f'<div class="completion" data-file="{path.name}" data-index="{i}">{coloured_rollout(r)}</div>'
            f'<div class="meta">mean KL {sum(r["teacher_kl"]) / max(len(r["teacher_kl"]), 1):.3f} per token'
            f'{", score " + str(r["score"]) if "score" in r else ""}</div></div>'
            for i, r in enumerate(records))
        rollout_html.append(f"<h3>{path.stem.replace('_', ' ')}</h3>{items}")

    start, last = summary.get("start_eval") or {}, summary.get("last_eval") or {}
    table = "".join(f"<tr><td>{html.escape(k)}</td><td>{start.get(k, float('nan')):.4f}</td><td>{v:.4f}</td></tr>"
                    for k, v in last.items() if isinstance(v, (int, float)))
    totals = {k: summary[k] for k in ("steps_done", "flops_total", "flops_total_with_data", "tokens_trained_total",
                                      "wall_s_total") if k in summary}
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>opd report: {html.escape(str(run_dir))}</title>
<style>
body {{ font-family: sans-serif; max-width: 980px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; }}
td:first-child {{ text-align: left; }}
.rollout {{ margin: 0.8em 0; }} .prompt {{ color: #555; font-size: 0.9em; }}
.completion {{ font-family: monospace; white-space: pre-wrap; line-height: 1.6; }}
.tok {{ border-radius: 2px; }} .meta {{ color: #777; font-size: 0.8em; }}
</style></head><body>
<h1>opd report</h1>
<p>run <code>{html.escape(str(run_dir))}</code>, method <b>{html.escape(str(summary.get("method", "?")))}</b>;
{html.escape(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in totals.items()))}</p>
<h2 id="evaluation">Evaluation: start and end</h2>
<table><tr><th>metric</th><th>start</th><th>end</th></tr>{table}</table>
<h2 id="curves">Curves</h2>
{"".join(f'<p><img src="{f}" alt="{f}"></p>' for f in figures) or "<p>no evaluations logged</p>"}
<h2 id="rollouts">Rollouts coloured by per-token teacher KL</h2>
<p>Each token of the student's sample is shaded by k = log p_student − log p_teacher of that token:
white where the teacher agrees, red (at {KL_SCALE:g} nats or more) where it would not have said it.
Hover a token for its value.</p>
{"".join(rollout_html) or "<p>no rollouts with teacher scores in this run</p>"}
</body></html>
"""
    out = run_dir / "report.html"
    out.write_text(page)
    return out
