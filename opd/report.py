"""`opd report RUN_DIR`: a self-contained picture of a run, `report.html` plus PNGs in the run dir.

* accuracy vs step and vs FLOPs (every `eval/.../accuracy` curve in metrics.jsonl);
* teacher KL vs step (training samples and evaluation);
* sampled rollouts with every token coloured by its log-ratio k = log p_student - log p_teacher (the
  single-sample term of the reverse-KL estimate, negative where the teacher likes the token more than
  the student), so a reader sees where the student forks from the teacher (white: the teacher agrees,
  which is not the same as correct; red: the teacher would not have said it).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

KL_SCALE = 4.0  # nats of per-token KL at which a token is fully red


class ReportError(FileNotFoundError):
    pass


def read_jsonl(path: Path) -> list[dict]:
    """metrics.jsonl or a rollouts file: a torn last line is skipped with a warning (opd.run_dir.read_metrics)."""
    from opd.run_dir import read_metrics

    return read_metrics(path)


def kl_colour(kl: float) -> str:
    """White at KL <= 0, red at KL >= KL_SCALE, linear in between (KL estimates can be negative)."""
    strength = min(max(kl / KL_SCALE, 0.0), 1.0)
    fade = round(255 * (1.0 - strength))
    return f"rgb(255,{fade},{fade})"


def coloured_rollout(record: dict) -> str:
    """One completion as HTML spans; each carries its KL as data-kl and as a tooltip. From a teacher
    of another tokenizer (`chunks` in the record) each token also names its chunk, and a chunk of
    several tokens is outlined as one."""
    spans = []
    chunks = record.get("chunks") or [None] * len(record["tokens"])
    sampled = record.get("sampled") or [1] * len(record["tokens"])  # 0: an environment token (opd.envs)
    for n, (token, kl, chunk) in enumerate(zip(record["tokens"], record["teacher_kl"], chunks)):
        style, title, data = f"background:{kl_colour(kl)}", f"k {kl:.3f} nats", ""
        if not sampled[n]:  # not the student's: greyed out, no KL, not trained on
            style, title, data = "background:#e4e4e4;color:#888", "environment (not trained on)", ' data-env="1"'
        if chunk is not None:
            if chunk >= 0 and chunk in chunks[max(n - 1, 0):n] + chunks[n + 1:n + 2]:
                style += ";border-bottom:2px solid #447"  # one chunk of several student tokens
            title += ", no signal" if chunk < 0 else f", chunk {chunk}"
            data = f' data-chunk="{chunk}"'
        spans.append(f'<span class="tok" style="{style}"{data} data-kl="{kl!r}" title="{title}">'
                     f'{html.escape(token)}</span>')
    return "".join(spans)


def _plot(path: Path, title: str, xlabel: str, ylabel: str, curves: dict[str, tuple[list, list]],
          levels: dict[str, float] | None = None, dashed: tuple[str, ...] = ()) -> bool:
    """A line plot of `curves`; `levels` are horizontal reference lines (e.g. the teacher)."""
    curves = {label: xy for label, xy in curves.items() if xy[0]}
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=label, linestyle="--" if label in dashed else "-")
    for i, (label, y) in enumerate((levels or {}).items()):
        ax.axhline(y, color="grey", linestyle=":", linewidth=1)
        # every other label on the right, so that two close levels do not print over each other
        ax.annotate(label, (0.01 if i % 2 == 0 else 0.99, y), xycoords=("axes fraction", "data"), fontsize=7,
                    color="grey", va="bottom", ha="left" if i % 2 == 0 else "right")
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


def _rollouts_html(run_dir: Path, shown: int, label: str = "") -> list[str]:
    """The first and the last logged steps' teacher-scored rollouts, coloured token by token."""
    files = sorted((run_dir / "rollouts").glob("step_*.jsonl"))
    blocks = []
    for path in files[:1] + files[-1:] if len(files) > 1 else files:
        records = [r for r in read_jsonl(path) if "teacher_kl" in r][:shown]
        if not records:
            continue
        items = "".join(
            f'<div class="rollout"><div class="prompt">{html.escape(r.get("prompt") or "")}</div>'
            f'<div class="completion" data-run="{html.escape(label)}" data-file="{path.name}" data-index="{i}">'
            f'{coloured_rollout(r)}</div>'
            f'<div class="meta">mean log-ratio k {sum(r["teacher_kl"]) / max(sum(r.get("sampled") or [1] * len(r["teacher_kl"])), 1):.3f} nats per '
            f'token (a one-sample estimate of the reverse KL: it can be negative)'
            f'{", score " + str(r["score"]) if "score" in r else ""}</div></div>'
            for i, r in enumerate(records))
        blocks.append(f"<h3>{html.escape(label + ' ' if label else '')}{path.stem.replace('_', ' ')}</h3>{items}")
    return blocks


def _colour_scale() -> str:
    """The legend: k from below 0 to KL_SCALE nats, as the tokens are shaded."""
    stops = [-1.0, 0.0, KL_SCALE / 4, KL_SCALE / 2, 3 * KL_SCALE / 4, KL_SCALE]
    cells = "".join(f'<span class="scale" style="background:{kl_colour(k)}">{"≤ 0" if k <= 0 else f"{k:g}"}'
                    f'{"+" if k == KL_SCALE else ""}</span>' for k in stops[1:])
    return f'<p class="legend">k (nats): {cells}</p>'


ROLLOUTS_INTRO = (f"<p>Each token of the student's sample is shaded by its log-ratio k = log p_student − log "
                  f"p_teacher: the single-sample term of the reverse-KL estimate (its mean over many samples is the "
                  f"KL; one token's k can be negative, where the teacher gives the token more probability than the "
                  f"student). White (k ≤ 0) means the teacher agrees with the token, <b>not</b> that the token is "
                  f"correct: a teacher can be confidently wrong. Red (k ≥ {KL_SCALE:g} nats) means the teacher would "
                  f"not have said it. Hover a token for its value.</p>" + _colour_scale())


def _page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 980px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; }}
td:first-child {{ text-align: left; }}
.rollout {{ margin: 0.8em 0; }} .prompt {{ color: #555; font-size: 0.9em; }}
.completion {{ font-family: monospace; white-space: pre-wrap; line-height: 1.6; }}
.tok {{ border-radius: 2px; }} .meta {{ color: #777; font-size: 0.8em; }}
.scale {{ display: inline-block; min-width: 3em; text-align: center; border: 1px solid #ddd; font-size: 0.8em; }}
</style></head><body>
{body}
</body></html>
"""


def _images(figures: list[str]) -> str:
    return "".join(f'<p><img src="{f}" alt="{f}"></p>' for f in figures) or "<p>no evaluations logged</p>"


def build_report(run_dir: str | Path, rollouts_shown: int = 4) -> Path:
    """report.html for one run; for the folder of a comparison (`opd demo`), the comparison's."""
    run_dir = Path(run_dir)
    if (run_dir / "comparison.json").is_file():
        return build_comparison_report(run_dir, rollouts_shown)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise ReportError(f"{run_dir}: no metrics.jsonl, so this is not a run directory of opd")
    rows = read_jsonl(metrics_path)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}

    accuracy_keys = sorted({k for r in rows for k in r if k.startswith("eval/") and k.endswith("accuracy")
                            and "instruction_accuracy" not in k and "teacher_" not in k})
    # the teacher's own accuracy, measured once at step 0: a line, the ceiling of its curve
    ceilings = {f"teacher {k.removeprefix('eval/').removesuffix('teacher_accuracy')}{v:.3f}": v
                for k, v in (rows[0] if rows else {}).items() if k.endswith("teacher_accuracy")
                and "instruction" not in k}
    figures = []
    if _plot(run_dir / "accuracy_vs_step.png", "held-out accuracy vs step", "step", "accuracy",
             {k: _curve(rows, "step", k) for k in accuracy_keys}, ceilings):
        figures.append("accuracy_vs_step.png")
    if _plot(run_dir / "accuracy_vs_flops.png", "held-out accuracy vs training FLOPs", "FLOPs (student + teacher)",
             "accuracy", {k: _curve(rows, "flops_total", k) for k in accuracy_keys}, ceilings):
        figures.append("accuracy_vs_flops.png")
    # several teachers: each one's KL on its own rows (teacher_kl/<name>) and each source's eval KL
    routed = sorted({k for r in rows for k in r if k.startswith("teacher_kl/")
                     or (k.startswith("eval/") and k.endswith("/teacher_kl"))})
    kl_curves = {k: _curve(rows, "step", k) for k in ("teacher_kl", "eval/teacher_kl", "eval/exact_kl", *routed)
                 if any(k in r for r in rows)}
    if _plot(run_dir / "teacher_kl_vs_step.png", "teacher KL vs step", "step", "nats per token", kl_curves):
        figures.append("teacher_kl_vs_step.png")

    from opd.compare import benchmark_scores

    benchmark_keys = sorted({k for r in rows for k in r if k.startswith("lm_eval/")})
    if _plot(run_dir / "lm_eval_vs_step.png", "lm-eval scores vs step", "step", "score",
             {k.removeprefix("lm_eval/"): _curve(rows, "step", k) for k in benchmark_keys}):
        figures.append("lm_eval_vs_step.png")
    start, last = summary.get("start_eval") or {}, summary.get("last_eval") or {}
    start = {**start, **{f"lm_eval/{k}": v for k, v in benchmark_scores(rows, last=False).items()}}
    last = {**last, **{f"lm_eval/{k}": v for k, v in benchmark_scores(rows).items()}}
    table = "".join(f"<tr><td>{html.escape(k)}</td><td>{start.get(k, float('nan')):.4f}</td><td>{v:.4f}</td></tr>"
                    for k, v in last.items() if isinstance(v, (int, float)))
    totals = {k: summary[k] for k in ("steps_done", "flops_total", "flops_total_with_data", "tokens_trained_total",
                                      "wall_s_total") if k in summary}
    body = f"""<h1>opd report</h1>
<p>run <code>{html.escape(str(run_dir))}</code>, method <b>{html.escape(str(summary.get("method", "?")))}</b>;
{html.escape(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in totals.items()))}</p>
<h2 id="evaluation">Evaluation: start and end</h2>
<table><tr><th>metric</th><th>start</th><th>end</th></tr>{table}</table>
<h2 id="curves">Curves</h2>
{_images(figures)}
<h2 id="rollouts">Rollouts coloured by the per-token log-ratio to the teacher</h2>
{ROLLOUTS_INTRO}
{"".join(_rollouts_html(run_dir, rollouts_shown)) or "<p>no rollouts with teacher scores in this run</p>"}"""
    out = run_dir / "report.html"
    out.write_text(_page(f"opd report: {run_dir}", body))
    return out


def _benchmarks_html(table: list[dict]) -> str:
    """The harness's last scores per method (eval.lm_eval), or nothing when no run logged any."""
    names = sorted({k for r in table for k in r.get("lm_eval", {})})
    if not names:
        return ""
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join(f"<tr><td>{html.escape(r['method'])}</td>"
                   + "".join(f"<td>{_fmt(r.get('lm_eval', {}).get(n), '.3f')}</td>" for n in names) + "</tr>"
                   for r in table)
    return f'<h2 id="lm-eval">lm-eval benchmarks (the last evaluation)</h2><table><tr><th></th>{head}</tr>{body}</table>'


def _fmt(value, spec: str = ".3g", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def build_comparison_report(out_dir: str | Path, rollouts_shown: int = 4) -> Path:
    """report.html for a comparison of methods from one start (comparison.json, written by
    opd.compare.run_comparison): the table, accuracy vs step and vs FLOPs for every method with
    the teacher's level, teacher KL vs step, and the KL-coloured rollouts of the runs that have them."""
    out_dir = Path(out_dir)
    comparison = json.loads((out_dir / "comparison.json").read_text())
    from opd.compare import mean_rows

    # one folder per method, or (`opd compare` of several seeds) a list of them: their mean curve
    runs = {name: [out_dir / rel for rel in ([rels] if isinstance(rels, str) else rels)]
            for name, rels in comparison["runs"].items()}
    rows = {name: mean_rows(paths) for name, paths in runs.items()}
    levels = {}
    if comparison.get("teacher_accuracy") is not None:
        levels = {f"teacher {comparison['teacher_accuracy']:.3f}": comparison["teacher_accuracy"],
                  f"target {comparison['target']:.3f}": comparison["target"]}
    if comparison.get("common_target") is not None:
        levels[f"common {comparison['common_target']:.3f}"] = comparison["common_target"]

    figures = []
    if _plot(out_dir / "accuracy_vs_step.png", "held-out accuracy vs step", "step", "accuracy (sampled pass@1)",
             {name: _curve(r, "step", "eval/accuracy") for name, r in rows.items()}, levels):
        figures.append("accuracy_vs_step.png")
    flops_curves = {name: _curve(r, "flops_total", "eval/accuracy") for name, r in rows.items()}
    with_data = {f"{name} (+ writing its data)": _curve(r, "flops_total_with_data", "eval/accuracy")
                 for name, r in rows.items() if any(x.get("flops_data_total") for x in r)}
    if _plot(out_dir / "accuracy_vs_flops.png", "held-out accuracy vs FLOPs", "FLOPs (student + teacher)",
             "accuracy (sampled pass@1)", {**flops_curves, **with_data}, levels, dashed=tuple(with_data)):
        figures.append("accuracy_vs_flops.png")
    kl_curves = {f"{name} (eval)": _curve(r, "step", "eval/teacher_kl") for name, r in rows.items()}
    kl_curves.update({f"{name} (training samples)": _curve(r, "step", "teacher_kl") for name, r in rows.items()})
    if _plot(out_dir / "teacher_kl_vs_step.png", "teacher KL on the student's samples vs step", "step",
             "nats per token", kl_curves, dashed=tuple(k for k in kl_curves if "training" in k)):
        figures.append("teacher_kl_vs_step.png")

    common = comparison.get("common_target")  # absent in folders written before it existed
    levels = {**({"target": "target"} if comparison.get("target") is not None else {}),
              **({"common": f"{common:.3f}"} if common is not None else {})}
    blank = "<td></td>" * (2 * len(levels) + 2)
    table_rows = [f"<tr><td>student start</td><td>{_fmt(comparison['table'][0]['start_accuracy'], '.3f')}</td>"
                  f"{blank}</tr>",
                  f"<tr><td>teacher</td><td>{_fmt(comparison.get('teacher_accuracy'), '.3f')}</td>{blank}</tr>"]
    for r in comparison["table"]:
        with_data = r["flops_total_with_data"] > r["flops_total"]

        def reached(suffix: str) -> str:
            if r.get(f"steps_to_{suffix}") is None:
                return "<td>not reached</td><td></td>"
            flops = _fmt(r[f"flops_to_{suffix}"])
            if with_data:
                flops += f" ({_fmt(r[f'flops_with_data_to_{suffix}'])} with data)"
            return f"<td>{r[f'steps_to_{suffix}']}</td><td>{flops}</td>"

        total_with_data = f" ({_fmt(r['flops_total_with_data'])} with data)" if with_data else ""
        table_rows.append(
            f"<tr><td>{html.escape(r['method'])}</td><td>{_fmt(r['final_accuracy'], '.3f')} "
            f"(best {_fmt(r['best_accuracy'], '.3f')})</td>{''.join(reached(s) for s in levels)}"
            f"<td>{_fmt(r['flops_total'])}{total_with_data}</td><td>{r['wall_s']:.0f} s</td></tr>")
    head = "".join(f"<th>steps to {name}</th><th>FLOPs to {name}</th>" for name in levels.values())
    common_text = ("" if common is None else
                   f" {common:.3f} is the highest accuracy that every method reached (the lowest of their best "
                   "evaluations): the steps and FLOPs to it compare the methods at one accuracy even when "
                   "none reaches the target.")
    target_text = ("No run measured a teacher's accuracy, so there is no target." if comparison.get("target") is None
                   else f"The target is {comparison['target_fraction']:.0%} of the teacher's held-out accuracy "
                        f"(the teacher evaluated at step 0 on the same prompts, with the same sampling).")
    rollouts = [block for name, paths in runs.items() for block in _rollouts_html(paths[0], rollouts_shown, name)]
    body = f"""<h1>opd comparison: {html.escape(", ".join(runs))}</h1>
<p>folder <code>{html.escape(str(out_dir))}</code>. {target_text}{common_text}</p>
<h2 id="table">Results</h2>
<table><tr><th></th><th>accuracy</th>{head}<th>FLOPs in all</th><th>wall time</th></tr>{"".join(table_rows)}</table>
{_benchmarks_html(comparison["table"])}
<h2 id="curves">Curves</h2>
{_images(figures)}
<h2 id="rollouts">Rollouts coloured by the per-token log-ratio to the teacher</h2>
{ROLLOUTS_INTRO}
{"".join(rollouts) or "<p>no rollouts with teacher scores</p>"}"""
    out = out_dir / "report.html"
    out.write_text(_page(f"opd comparison: {out_dir}", body))
    return out
