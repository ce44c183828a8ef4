"""`opd sample`: the teacher writes completions to JSONL, the data of off-policy distillation (SFT
on teacher samples). Each line keeps the prompt's record, adds the completion and what it cost the
teacher to write (FLOPs, tokens), so that SFT can be charged for its data: `opd sft` reads
`cost.flops` and reports `flops_total_with_data` beside the training FLOPs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rich.console import Console

from opd.config import ConfigError, RunConfig
from opd.data import encode_prompts
from opd.evaluation import completion_texts, grade_rollouts
from opd.flops import ModelCost, generation_flops
from opd.hardware import set_threads
from opd.models import load_model, pick_device
from opd.progress import stage_progress
from opd.sampler.hf import HFSampler
from opd.tasks import is_graded


def write_teacher_samples(cfg: RunConfig, out: Path, split: str = "train", only_correct: bool = False,
                          console: Console | None = None) -> dict:
    """Sample `sampling.samples_per_prompt` teacher completions for each prompt of `split` and write
    them to `out`. With `only_correct`, keep the completions the grader scores 1 (rejection
    sampling); the cost of the rejected ones is spread over the kept ones, since it was paid."""
    from opd.data.sources import prompt_records
    from opd.resume import seed_everything

    if cfg.teacher is None:
        raise ConfigError("opd sample needs a `teacher` (the model that writes the completions)")
    console = console or Console()
    seed_everything(cfg.train.seed)
    set_threads(cfg.train.threads)  # the cores this process may use (opd.hardware)
    model, tokenizer = load_model(cfg.teacher, pick_device(cfg.train.device))
    model.eval()
    prompts, skipped = encode_prompts(prompt_records(cfg, split), tokenizer, cfg.data.max_prompt_tokens,
                                      cfg.data.overlong)
    if only_correct and not any(is_graded(p.record, cfg.data.grader) for p in prompts):
        raise ConfigError("--only-correct needs a grader: task.name, data.grader or a `grader` field in each record")
    sampler = HFSampler(model, tokenizer, cfg.sampling)
    cost = ModelCost.from_model(model)

    rows, total_flops, started = [], 0, time.perf_counter()
    per_call = cfg.train.prompts_per_step
    with stage_progress("sample", console, disable=not cfg.log.progress, unit="prompt") as progress:
        task = progress.add_task("sample", total=len(prompts), status="")
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start:start + per_call]
            rollouts = sampler.sample([p.ids for p in chunk], prompts=chunk)
            grades = grade_rollouts(rollouts, tokenizer, cfg.data.grader)
            lengths = rollouts.completion_lengths.long().tolist()
            for text, group, length, truncated, g in zip(completion_texts(rollouts, tokenizer),
                                                         rollouts.group_ids.tolist(), lengths,
                                                         rollouts.truncated.tolist(), grades):
                flops = generation_flops(cost, len(chunk[group].ids), length)
                total_flops += flops
                row = {**chunk[group].record, "completion": text, "truncated": truncated,
                       "cost": {"flops": flops, "tokens": length}}
                if g is not None:
                    row["score"] = g.score
                rows.append(row)
            progress.update(task, completed=start + len(chunk))
    seconds = time.perf_counter() - started

    kept = [r for r in rows if r.get("score") == 1.0] if only_correct else rows
    if kept and len(kept) < len(rows):
        share = total_flops / len(kept)
        for r in kept:
            r["cost"] = {**r["cost"], "flops": share}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, out)  # a crash never leaves half a file under the final name
    graded = [r["score"] for r in rows if "score" in r]
    return {"out": str(out), "prompts": len(prompts), "skipped_prompts": skipped, "samples": len(rows),
            "written": len(kept), "accuracy": sum(graded) / len(graded) if graded else None,
            "teacher_flops": total_flops, "teacher_tokens": sum(r["cost"]["tokens"] for r in rows),
            "seconds": seconds}
