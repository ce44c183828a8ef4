"""experiments/RESULTS_blog_claims.md from experiments/results/blog_claims.json (blog_claims.py write):
every figure comes from the file; the text states only what the figures are."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def _fmt(x, spec=".3f") -> str:
    return "–" if x is None else format(x, spec)


def _ms(values: list, spec=".3f") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(statistics.fmean(values), spec)} ± {format(sd, spec)}" + (f" (n={len(values)})" if len(values) else "")


def _header(results: dict, section: str) -> list[str]:
    machine = results.get("machine", {}).get(section, {})
    return [f"Command: `{results['commands'][section]}`  ",
            f"Machine: `{json.dumps(machine)}`; {results['seconds'][section] / 60:.1f} min (the last invocation "
            "that trained runs; earlier ones of a resumed stage are not counted).", ""]


def sweep_section(results: dict, title: str = "## Item 2: each method at its own learning rate") -> list[str]:
    table = results["sweep"]
    kl = all(r.get("teacher_kl") for r in table.values())  # recorded for the sums task's runs
    lines = [title, "",
             "### The sweep (seed 0, validation split)", "", *_header(results, "sweep"),
             "| run | val accuracy, mean of last 3 evals (chooses) | final | best | median grad norm | "
             "steps clipped | FLOPs | FLOPs, data paid |" + (" val teacher KL, start → final |" if kl else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if kl else "")]
    for name, r in sorted(table.items(), key=lambda kv: (kv[1]["method"], kv[1]["lr"], not kv[1]["clip"])):
        lines.append(f"| {name} | {r['late']:.3f} | {r['final']:.3f} | {r['best']:.3f} | "
                     f"{_fmt(r['grad_norm_median'], '.2f')} | {r['grad_clipped_steps']}/{r['steps']} | "
                     f"{r['flops_total']:.2e} | {r['flops_total_with_data']:.2e} |"
                     + (f" {r['teacher_kl'][0][1]:.3f} → {r['teacher_kl'][-1][1]:.3f} |" if kl else ""))
    if kl:
        start = next(iter(table.values()))["accuracy"][0][1]
        lines += ["", f"The student start's validation accuracy (step 0): {start:.3f}. Teacher KL: the sampled "
                  "reverse-KL estimate (nats/token) of the teacher on the student's validation samples."]
    return lines + [""]


def seeds_section(results: dict) -> list[str]:
    s = results["seeds"]
    per_seed = list(s["per_seed"].values())
    lines = ["### The chosen settings, test split", "", *_header(results, "seeds"),
             "Chosen: " + ", ".join(f"{m} lr {p['lr']:g}{'' if p['clip'] else ' (no clipping)'}"
                                    for m, p in s["picks"].items()) + f"; seeds {', '.join(s['per_seed'])}.  ",
             f"Student start's test accuracy {per_seed[0]['table'][0]['start_accuracy']:.3f}; "
             f"teacher's {s['teacher_accuracy_test']:.3f}; target 95% of it (so reached at step 0). Common accuracy per seed: "
             + ", ".join(f"{c['common_target']:.3f}" for c in per_seed) + ".", "",
             "| method | final | best | reached 95% of teacher | steps to common | FLOPs to common | "
             "FLOPs to common, data paid | ÷ distill's (steps / FLOPs / data paid) |",
             "|---|---|---|---|---|---|---|---|"]
    methods = [r["method"] for r in per_seed[0]["table"]]

    def col(m, key):
        return [next(r for r in c["table"] if r["method"] == m)[key] for c in per_seed]

    base = {k: statistics.fmean(v for v in col("distill", k) if v is not None) if any(col("distill", k)) else None
            for k in ("steps_to_common", "flops_to_common", "flops_with_data_to_common")}
    for m in methods:
        ratios = []
        for k in ("steps_to_common", "flops_to_common", "flops_with_data_to_common"):
            vals = [v for v in col(m, k) if v is not None]
            ratios.append(f"{statistics.fmean(vals) / base[k]:.2f}" if vals and base[k] else "–")
        lines.append(f"| {m} | {_ms(col(m, 'final_accuracy'))} | {_ms(col(m, 'best_accuracy'))} | "
                     f"{sum(v is not None for v in col(m, 'steps_to_target'))}/{len(per_seed)} | "
                     f"{_ms(col(m, 'steps_to_common'), '.0f')} | {_ms(col(m, 'flops_to_common'), '.2e')} | "
                     f"{_ms(col(m, 'flops_with_data_to_common'), '.2e')} | {' / '.join(ratios)} |")
    return lines + [""]


def plateau_section(results: dict) -> list[str]:
    p = results["plateau"]
    at = p["plateau"]
    curve = ", ".join(f"{s}: {a:.3f}" for s, a in p["long_run"]["accuracy"])
    lines = ["## Item 1: from SFT's plateau", "", *_header(results, "plateau"),
             f"SFT on teacher samples (lr {p['sft_lr']:g}) from the student start, validation accuracy by step: {curve}.  ",
             f"Plateau (first evaluation not beaten by the next 3): step {at['step']}, val accuracy "
             f"{at['val_accuracy']:.3f}, {_fmt(at['flops_total'], '.2e')} FLOPs "
             f"({_fmt(at['flops_total_with_data'], '.2e')} with its data paid).", "",
             "From that checkpoint, on the test split:", "",
             "| method | start | final | best | steps to common | FLOPs to common | FLOPs to common, data paid | FLOPs in all |",
             "|---|---|---|---|---|---|---|---|"]
    c = p["from_plateau"]
    for r in c["table"]:
        lines.append(f"| {r['method']} | {r['start_accuracy']:.3f} | {r['final_accuracy']:.3f} | {r['best_accuracy']:.3f} | "
                     f"{_fmt(r['steps_to_common'], 'd') if r['steps_to_common'] is not None else '–'} | "
                     f"{_fmt(r['flops_to_common'], '.2e')} | {_fmt(r['flops_with_data_to_common'], '.2e')} | "
                     f"{r['flops_total']:.2e} |")
    lines.append(f"\nCommon accuracy (highest both reached): {c['common_target']:.3f}; teacher (test) "
                 f"{_fmt(c['teacher_accuracy'])}.")
    return lines + [""]


def facts_rows(name: str, f: dict) -> list[str]:
    r = f["references"]
    rows = [f"| {name}: reference answers (train split, {r['count']}) | – | {r['length_mean']:.1f} "
            f"({r['length_min']}–{r['length_max']}) | {r['over_max_new_tokens']:.3f} | {r['correction_rate']:.3f} | – | – |"]
    for who in ("teacher", "student_start"):
        x = f[who]
        rows.append(f"| {name}: {who.replace('_', ' ')}'s samples ({x['samples']}) | {x['accuracy']:.3f} | "
                    f"{x['length_mean']:.1f} ({x['length_min']}–{x['length_max']}) | {x['truncated']:.3f} | "
                    f"{x['correction_rate']:.3f} | {_fmt(x['teacher_entropy'], '.3f')} | {_fmt(x['teacher_kl'], '.3f')} |")
    return rows


def facts_section(sums: dict, demo: dict) -> list[str]:
    f = sums["facts"]
    lines = ["### What the task gives the mechanisms to act on (test split)", "", *_header(sums, "facts"),
             f"Lengths in tokens of the tiny tokenizer, with the end-of-turn token; max_new_tokens {f['max_new_tokens']}; "
             f"{f['samples_per_problem']} samples per test problem (sampled pass@1, temperature 1). Truncated: the "
             "share that hit max_new_tokens without ending (for references: longer than it). Corrections: the "
             "share holding \", no: \". Teacher entropy and teacher KL (sampled reverse-KL estimate): nats per "
             "token, the teacher scoring those samples.", "",
             "| what | accuracy | length, mean (range) | truncated | corrections | teacher entropy on them | teacher KL |",
             "|---|---|---|---|---|---|---|", *facts_rows("sums", f)]
    if "facts" in demo:
        lines += facts_rows("demo", demo["facts"])
        lines += ["", "The demo rows: " + " ".join(x.strip() for x in _header(demo, "facts")[:2])]
        machines = demo.get("machine", {})
        if machines.get("facts") != machines.get("sweep"):
            lines += ["The demo's teacher and student start in these rows were built (from the demo's recipe) on this "
                      "machine, not on the one the demo's sweep and seeds ran on (see the Machine lines): other "
                      "kernels train other tiny models, so their accuracies differ from those tables."]
    return lines + [""]


def curves_section(s: dict) -> list[str]:
    runs = s["runs"]
    seeds = list(runs)
    methods = list(runs[seeds[0]])
    teacher = s["teacher_accuracy_test"]
    lines = [f"Test accuracy by step, mean over {len(seeds)} seed(s):", "",
             "| method | " + " | ".join(str(st) for st, _ in runs[seeds[0]][methods[0]]["accuracy"]) + " |",
             "|---|" + "---|" * len(runs[seeds[0]][methods[0]]["accuracy"])]
    for m in methods:
        cells = []
        for i in range(len(runs[seeds[0]][m]["accuracy"])):
            vals = [runs[sd][m]["accuracy"][i][1] for sd in seeds if i < len(runs[sd][m]["accuracy"])]
            cells.append(f"{statistics.fmean(vals):.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if all(runs[sd][m].get("teacher_kl") for sd in seeds for m in methods):
        lines += ["", "Teacher KL on the student's test samples (nats/token), mean over the seeds:", "",
                  "| method | " + " | ".join(str(st) for st, _ in runs[seeds[0]][methods[0]]["teacher_kl"]) + " |",
                  "|---|" + "---|" * len(runs[seeds[0]][methods[0]]["teacher_kl"])]
        for m in methods:
            width = min(len(runs[sd][m]["teacher_kl"]) for sd in seeds)
            lines.append(f"| {m} | " + " | ".join(
                f"{statistics.fmean(runs[sd][m]['teacher_kl'][i][1] for sd in seeds):.3f}" for i in range(width)) + " |")
    lines += ["", f"First evaluation at or above a level (a fraction of the teacher's test accuracy {teacher:.3f}); "
              "steps and FLOPs are means over the seeds that reached it; FLOPs, data paid: SFT also pays for the "
              "teacher writing its samples.", "",
              "| method | level | reached | step | FLOPs | FLOPs, data paid |", "|---|---|---|---|---|---|"]
    for m in methods:
        for lv in s["level_fractions"]:
            got = [runs[sd][m]["levels"][str(lv)] for sd in seeds]
            hit = [g for g in got if g["step"] is not None]
            acc = got[0]["accuracy"]
            lines.append(f"| {m} | {lv:g} × teacher = {acc:.3f} | {len(hit)}/{len(got)} | "
                         f"{_ms([g['step'] for g in hit], '.0f')} | {_ms([g['flops'] for g in hit], '.2e')} | "
                         f"{_ms([g['flops_with_data'] for g in hit], '.2e')} |")
    lines += ["", "| method | final | best | steps clipped (grad norm > 1) | median grad norm |", "|---|---|---|---|---|"]
    for m in methods:
        rs = [runs[sd][m] for sd in seeds]
        lines.append(f"| {m} | {_ms([r['final'] for r in rs])} | {_ms([r['best'] for r in rs])} | "
                     + ", ".join(f"{r['grad_clipped_steps']}/{r['steps']}" for r in rs)
                     + f" | {_ms([r['grad_norm_median'] for r in rs], '.2f')} |")
    return lines + [""]


def sums_seeds_section(sums: dict, section: str = "seeds",
                       title: str = "### The chosen settings, test split") -> list[str]:
    s = sums[section]
    lines = [title, "", *_header(sums, section),
             "Chosen on validation: " + ", ".join(f"{m} lr {p['lr']:g}{'' if p['clip'] else ' (no clipping)'}"
                                                  for m, p in s["picks"].items())
             + f"; seeds {', '.join(s['runs'])}.", ""]
    return lines + curves_section(s)


def sums_part(sums: dict, demo: dict) -> list[str]:
    lines = ["## Item 3: the sums task (long answers, several paths, self-correction)", "",
             "`task.name=sums` (`opd/tasks/sums.py`): \"Add 4, 1, 2, 2, 2.\" answered as partial sums in an order the "
             "writer chooses (any number still left may come next), each step listing what is left, \"... The "
             "answer is 11.\"; in 10% of the reference answers one sum is first written off by one and corrected "
             "(\"5+2=8, no: 5+2=7\"). Teacher and student start: tiny Llamas of the demo's shape (hidden 128, 2 "
             "layers) trained by SFT on the reference answers, the teacher 1200 steps, the student 300. The 128 "
             "held-out problems are split by seed 31 into validation (64) and test (64), as for the demo; the "
             "training prompts skip all 128. Graded on the final number.", ""]
    if "facts" in sums:
        lines += facts_section(sums, demo)
    if "sweep" in sums:
        lines += sweep_section(sums, "### Item 2 on sums: each method at its own learning rate")
    if "seeds" in sums:
        lines += sums_seeds_section(sums)
    if "long" in sums:
        lines += sums_seeds_section(sums, "long", f"### A longer budget: {sums['long']['steps']} steps, one seed, test split")
    if "plateau" in sums:
        lines += ["### Item 1 on sums (one seed)", ""] + plateau_section(sums)[1:]
    else:
        lines += ["### Item 1 on sums: from SFT's plateau", "", "Not run (`blog_claims.py plateau --task sums`).", ""]
    return lines


def write(all_results: dict, path: Path) -> None:
    results = all_results["demo"]
    lines = ["# The blog's claims, tested the way the blog tested them (issue 31)", "",
             "Generated by `experiments/blog_claims.py write` from `experiments/results/blog_claims.json` "
             "(the demo task) and `experiments/results/blog_claims_sums.json` (the sums task); "
             "no figure typed by hand. Task and models: the demo's (`opd/cli/demo.py`). The 128 held-out "
             "problems are split by a fixed seed (31) into a validation half (64, chooses settings) and a "
             "test half (64, reports); accuracy is sampled pass@1, 2 samples per problem.", ""]
    if "sweep" in results:
        lines += sweep_section(results)
    if "seeds" in results:
        lines += seeds_section(results)
    if "plateau" in results:
        lines += plateau_section(results)
    else:
        lines += ["## Item 1: from SFT's plateau", "", "Not run (`blog_claims.py plateau` exists, untested): the "
                  "session's time went to item 2. Items 4-5 (RL teacher, SmolLM2 personalization): not run.", ""]
    if all_results.get("sums"):
        lines += sums_part(all_results["sums"], results)
    path.write_text("\n".join(lines) + "\n")
