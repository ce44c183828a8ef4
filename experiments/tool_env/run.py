"""Distil vs RL on the calculator Env (issue 29): word problems that need the tool, from one student
that does not use it.

1. Task: arithmetic word problems, products of two numbers from 2 to 99 ("A crate holds 37 boxes
   of 41 apples. How many apples are in the crate?"), graded on the final answer; eval problems are
   held out from training.
2. Teacher: a tiny Llama trained by SFT on tool-using transcripts: "<calc>37 * 41</calc>" -> tool
   "37 * 41 = 1517" -> "The answer is 1517." (the whole transcript is its target).
   No-tool student: the same architecture, the same problems and the same SFT budget, answered
   directly ("The answer is 1517."): it has to multiply in its head, and a tiny model cannot.
3. `opd distill` (loss.kind=reverse_kl: the teacher scores whole episodes, the loss counts the
   student's tokens only), the same with loss.kind=forward_kl, and `opd rl` (the Env's reward, no
   teacher) from the no-tool student, same steps; every eval runs the Env (the teacher's KL is
   measured on the student's tokens).

    OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/tool_env/run.py OUT_DIR
    OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/tool_env/run.py OUT_DIR --longer 1200   # + forward KL, longer
    python experiments/tool_env/run.py --results OUT_DIR/results.json   # rewrite RESULTS.md only
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from opd.config import LossConfig, OptimConfig, TaskConfig, TinyModelConfig, load_config
from opd.eval_command import run_eval
from opd.hardware import cpu_name, usable_cores
from opd.learner.learner import Learner
from opd.loop import train
from opd.rollouts import sequence_batch
from opd.run_dir import read_metrics
from opd.tasks import make_records
from opd.tiny import build_tiny_model, build_tiny_tokenizer

TASK = {"digits": 2, "operations": 1, "operators": "*", "words": True}
TASK_OVERRIDES = ["task.name=arithmetic", "task.arithmetic.digits=2", "task.arithmetic.operations=1",
                  "task.arithmetic.operators=\"*\"", "task.arithmetic.words=true"]
ENV_OVERRIDES = ["env.class=calculator", "env.max_turns=3", "env.max_tokens=64", "sampling.max_new_tokens=20"]
WIDTH = 64  # teacher and student: the same tiny Llama (2 layers)
SFT_STEPS, SFT_BATCH, SFT_PROBLEMS, SFT_LR = 1200, 32, 8000, 3e-3
EVAL_PROBLEMS = 100  # held out (the train split skips them)
STEPS, EVAL_EVERY = 300, 100


def with_tool(record):
    expression, answer = record["expression"], record["answer"]
    return record["messages"] + [{"role": "assistant", "content": f"<calc>{expression}</calc>"},
                                 {"role": "tool", "content": f"{expression} = {answer}"},
                                 {"role": "assistant", "content": f"The answer is {answer}."}]


def without_tool(record):
    return record["messages"] + [{"role": "assistant", "content": f"The answer is {record['answer']}."}]


def sft(path: Path, conversation) -> Path:
    """SFT of a fresh tiny model on `conversation(record)` for every training problem (the target is
    everything after the prompt); the same seed, data order and schedule for every caller."""
    start = time.time()
    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    model = build_tiny_model(TinyModelConfig(hidden_size=WIDTH, seed=2), tok)
    task = TaskConfig(name="arithmetic", arithmetic=TASK, train_size=SFT_PROBLEMS, eval_size=EVAL_PROBLEMS)
    seqs, starts = [], []
    for r in make_records(task, "train"):
        prompt = tok.apply_chat_template(r["messages"], add_generation_prompt=True, return_dict=True)["input_ids"]
        seqs.append(list(tok.apply_chat_template(conversation(r), return_dict=True)["input_ids"]))
        starts.append(len(prompt))
    optim = OptimConfig(lr=SFT_LR, warmup_steps=20, schedule="cosine", min_lr_ratio=0.05)
    learner = Learner(model, optim, LossConfig(), SFT_STEPS, 64, objective="cross_entropy")
    for step in range(SFT_STEPS):
        rows = [(step * SFT_BATCH + i) % len(seqs) for i in range(SFT_BATCH)]
        metrics = learner.train_step(sequence_batch([seqs[i] for i in rows], [starts[i] for i in rows], tok.pad_token_id),
                                     None)
        if step % 200 == 0:
            print(f"sft {path.name}", step, round(metrics["loss"], 3), flush=True)
    learner.save(path, tok)
    (path / "sft_minutes.txt").write_text(f"{(time.time() - start) / 60:.2f}\n")  # read back for RESULTS.md
    return path


def accuracy(model: Path) -> dict:
    """The model on the held-out problems with the calculator Env, as the runs' evals measure it."""
    result = run_eval(str(model), [], None, TASK_OVERRIDES + ENV_OVERRIDES + [f"task.eval_size={EVAL_PROBLEMS}"])
    metrics = next(iter(result["sets"].values()))
    return {k: metrics.get(k) for k in ("accuracy", "env/tool_call_rate", "env/turns", "env/truncated")}


# The arms, all from the no-tool student: (method, settings).
ARMS = {
    "distill": ("distill", ["loss.kind=reverse_kl"]),  # the exact reverse KL per sampled position (same tokenizer)
    # the same with the forward KL (teacher || student), mass-covering: it raises the teacher's tokens
    # (`<calc>`) however unlikely the student finds them
    "distill_forward_kl": ("distill", ["loss.kind=forward_kl"]),
    "rl": ("rl", ["loss.kl_coef=0"]),  # plain RL: the Env's reward only (the teacher only measures KL at eval)
}


def run(name: str, teacher: Path, student: Path, out: Path, extra: tuple = ()) -> list[dict]:
    method, settings = ARMS[name]
    if (out / name).exists():  # this script's own run folder from an earlier call: run it again
        shutil.rmtree(out / name)
    overrides = [f"method={method}", f"run_dir={out / name}", f"student.path={student}", f"teacher.path={teacher}",
                 *TASK_OVERRIDES, *ENV_OVERRIDES, f"task.eval_size={EVAL_PROBLEMS}",
                 "sampling.samples_per_prompt=4", "train.prompts_per_step=8", "train.micro_batch_size=32",
                 f"train.steps={STEPS}", "optim.lr=1e-3", "optim.warmup_steps=2", f"eval.every={EVAL_EVERY}",
                 "eval.teacher_accuracy=false", "log.progress=false", "log.tensorboard=false", "checkpoint.every=0",
                 *settings, *extra]
    train(load_config(None, overrides))
    return read_metrics(out / name / "metrics.jsonl")


def all_equal_fraction(records: list[dict]) -> float:
    """The share of training groups whose episodes all got the same reward (no RL signal), over the run."""
    values = [r["groups_all_equal_frac"] for r in records if "groups_all_equal_frac" in r]
    return sum(values) / max(len(values), 1)


def machine() -> str:
    return (f"{cpu_name()}, {usable_cores()} cores (shared with other jobs), torch {torch.__version__} on "
            f"{torch.get_num_threads()} thread(s)")


KEYS = ("step", "eval/accuracy", "eval/env/tool_call_rate", "eval/env/turns", "eval/teacher_kl", "eval/env/truncated",
        "eval/truncated", "eval/completion_len")


def fmt(x, digits=3):
    return "" if x is None else f"{x:.{digits}f}"


def reading(results: dict) -> str:
    """What the figures say, written from them (the wording follows the numbers)."""
    models, runs, steps = results["models"], results["runs"], results["setting"]["steps"]
    first, last = {n: rows[0] for n, rows in runs.items()}, {n: rows[-1] for n, rows in runs.items()}
    text = [f"Reading: with the calculator the tiny teacher solves {models['teacher']['accuracy']:.0%} of the held-out "
            f"problems; the same model trained on the same problems to answer directly solves "
            f"{models['no_tool']['accuracy']:.0%}: a 2-digit product is out of reach of a tiny model's head, and in "
            f"reach of one that copies the two numbers into the tool and its result into the answer."]
    for name, what in (("distill", "Reverse-KL distillation"), ("distill_forward_kl", "Forward-KL distillation"),
                       ("rl", "RL")):
        if name not in runs:
            continue
        a, b = first[name], last[name]
        text.append(f"{what} from the no-tool student: tool-call rate {a['eval/env/tool_call_rate']:.2f} -> "
                    f"{b['eval/env/tool_call_rate']:.2f}, teacher KL {a['eval/teacher_kl']:.2f} -> "
                    f"{b['eval/teacher_kl']:.2f}, accuracy {a['eval/accuracy']:.2f} -> {b['eval/accuracy']:.2f} "
                    f"after {steps} steps.")
    reverse_stuck = "distill" in runs and last["distill"]["eval/env/tool_call_rate"] < 0.1
    forward_moves = "distill_forward_kl" in runs and last["distill_forward_kl"]["eval/env/tool_call_rate"] >= 0.3
    if reverse_stuck and forward_moves:
        text.append("Why the start matters: the no-tool student is confident in `The answer is` as its first words, where "
                    "the teacher wants `<calc>`. The exact reverse KL's gradient on a token's logit is the student's own "
                    "probability of it times its log-ratio, so a token the student gives ~0 (the `<` of `<calc>`) gets "
                    "~0 push however much the teacher wants it: reverse KL (mode-seeking) can only move the student among "
                    "the continuations it already samples, and rather than discover the tool it drifts to whatever the "
                    f"teacher dislikes least there (here: strings of digits, {last['distill']['eval/truncated']:.0%} "
                    "of its eval turns run to max_new_tokens). The forward KL weighs each token by the teacher's probability, so it "
                    "raises `<calc>` directly.")
    if "rl" in runs:
        text.append(f"RL needs a correct answer to learn from, and the no-tool student almost never has one: "
                    f"{results['groups_all_equal_frac']['rl']:.1%} of its training groups of 4 are all-equal "
                    "(every episode the same reward), their advantage 0. The few others still move it, Adam giving "
                    "their rare gradients full-size steps, and not towards the tool: the teacher KL rises "
                    f"({first['rl']['eval/teacher_kl']:.2f} -> {last['rl']['eval/teacher_kl']:.2f}).")
    main = [name for name in runs if name in ARMS]
    if max(r["eval/accuracy"] for name in main for r in runs[name][1:]) < 0.05:
        text.append(f"None of the arms moves accuracy within {steps} steps (the budget of this CPU run): learning the "
                    "protocol (calling the tool) comes first, then copying the operands and the tool's result "
                    "exactly, which takes longer. Small and short: a demonstration of the mechanism, not a benchmark.")
    else:
        text.append("Small and short: a demonstration of the mechanism, not a benchmark.")
    extra = results["setting"].get("longer")
    if extra:
        rows = runs[f"distill_forward_kl_{extra['steps']}"]
        best = max(rows, key=lambda r: r["eval/accuracy"])
        text.append(f"Longer (`--longer {extra['steps']}`, {extra['minutes']:.1f} more minutes): forward-KL "
                    f"distillation for {extra['steps']} steps reaches tool-call rate "
                    f"{rows[-1]['eval/env/tool_call_rate']:.2f}, teacher KL {rows[-1]['eval/teacher_kl']:.2f} and "
                    f"accuracy {rows[-1]['eval/accuracy']:.2f} (best {best['eval/accuracy']:.2f}, step {best['step']}).")
    return "\n".join(text).replace("\n", " ")


def write_results(results: dict, path: Path) -> None:
    """RESULTS.md from results.json: every figure below comes from it."""
    models, setting = results["models"], results["setting"]
    lines = [
        "# Distil vs RL on the calculator Env (issue 29)", "",
        "Written by `experiments/tool_env/run.py` from `results.json`; the commands:", "",
        f"    {setting['command']}", "",
        f"Machine: {setting['machine']}. Minutes: SFT of the teacher {setting['sft_minutes']['teacher']:.1f}, of the "
        f"no-tool student {setting['sft_minutes']['no_tool']:.1f} (a rerun into the same folder reuses both), evals "
        f"and runs {setting['minutes_after_sft']:.1f}.", "",
        f"Task: word problems, products of two numbers from 2 to 99 in {setting['templates']} templates (\"A crate "
        "holds 37 boxes of 41 apples. How many apples are in the crate?\"), graded on the final answer; "
        f"{setting['eval_problems']} held-out eval problems, 1 sample each at temperature 1, the calculator Env run "
        f"too (max_turns 3, max_tokens 64, max_new_tokens 20). Models: a tiny Llama ({setting['width']} wide, 2 "
        f"layers), SFT for {setting['sft_steps']} steps x {setting['sft_batch']} on {setting['sft_problems']} "
        "training problems (lr 3e-3, cosine).", "",
        "| model (SFT) | target | eval accuracy | tool-call rate | turns |", "|---|---|---|---|---|",
        f"| teacher | `<calc>a * b</calc>`, tool `a * b = c`, `The answer is c.` | {fmt(models['teacher']['accuracy'])} "
        f"| {fmt(models['teacher']['env/tool_call_rate'])} | {fmt(models['teacher']['env/turns'], 2)} |",
        f"| no-tool student | `The answer is c.` | {fmt(models['no_tool']['accuracy'])} "
        f"| {fmt(models['no_tool']['env/tool_call_rate'])} | {fmt(models['no_tool']['env/turns'], 2)} |", "",
        f"From the no-tool student, {setting['steps']} steps of 8 prompts x 4 episodes each, lr 1e-3: `distill` "
        "(loss.kind=reverse_kl: the teacher scores the whole episode, the loss is on the student's tokens only), "
        "`distill_forward_kl` (the same with loss.kind=forward_kl) and `rl` (the Env's reward, kl_coef 0). "
        "Teacher KL: the sampled estimate on the student's own tokens of the eval episodes (tool messages excluded). "
        "Truncated episodes: past env.max_tokens; turns cut: a sampled turn that ran to max_new_tokens (20) "
        "without ending.", "",
        "| run | step | eval accuracy | tool-call rate | turns | teacher KL (student tokens) | truncated episodes "
        "| turns cut at max_new_tokens | student tokens per episode |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results["runs"].items():
        for r in rows:
            lines.append(f"| {name} | {r['step']} | {fmt(r['eval/accuracy'])} | {fmt(r['eval/env/tool_call_rate'])} "
                         f"| {fmt(r['eval/env/turns'], 2)} | {fmt(r['eval/teacher_kl'], 2)} "
                         f"| {fmt(r['eval/env/truncated'], 2)} | {fmt(r.get('eval/truncated'), 2)} "
                         f"| {fmt(r.get('eval/completion_len'), 1)} |")
    if "longer" in setting:
        lines[5:5] = [f"    {setting['longer']['command']}"]
    lines += ["", reading(results), ""]
    path.write_text("\n".join(lines))


def longer(out: Path, steps: int, here: Path) -> None:
    """The forward-KL arm again for `steps` steps, from the same student, added to OUT/results.json."""
    name, start = f"distill_forward_kl_{steps}", time.time()
    done = out / name / "longer.json"  # kept, so that a second call only merges
    if not done.exists():
        records = run("distill_forward_kl", out / "teacher", out / "no_tool", out,
                      (f"run_dir={out / name}", f"train.steps={steps}", f"eval.every={max(steps // 5, 1)}"))
        done.write_text(json.dumps({"minutes": (time.time() - start) / 60}))
    if not (out / "results.json").exists():
        sys.exit(f"{out / 'results.json'} is missing: run `run.py {out}` first, then this again (it only merges now)")
    results, longer_run = json.loads((out / "results.json").read_text()), json.loads(done.read_text())
    records = read_metrics(out / name / "metrics.jsonl")
    results["runs"][name] = [{k: r.get(k) for k in KEYS} for r in records if "eval/accuracy" in r]
    results["groups_all_equal_frac"][name] = all_equal_fraction(records)
    results["setting"]["longer"] = {"steps": steps, "minutes": longer_run["minutes"], "command":
                                    f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} PYTHONPATH=. python "
                                    f"experiments/tool_env/run.py {out} --longer {steps}"}
    for path in (out / "results.json", here / "results.json"):
        path.write_text(json.dumps(results, indent=1))
    write_results(results, here / "RESULTS.md")


if __name__ == "__main__":
    here = Path(__file__).parent
    if sys.argv[1:2] == ["--results"]:
        write_results(json.loads(Path(sys.argv[2]).read_text()), here / "RESULTS.md")
        sys.exit(0)
    if sys.argv[2:3] == ["--longer"]:
        longer(Path(sys.argv[1]), int(sys.argv[3]), here)
        sys.exit(0)
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tool_env")
    out.mkdir(parents=True, exist_ok=True)
    teacher = out / "teacher" if (out / "teacher").exists() else sft(out / "teacher", with_tool)
    no_tool = out / "no_tool" if (out / "no_tool").exists() else sft(out / "no_tool", without_tool)
    after_sft = time.time()
    models = {"teacher": accuracy(teacher), "no_tool": accuracy(no_tool)}
    print(json.dumps(models), flush=True)
    runs, all_equal = {}, {}
    for name in ARMS:
        records = run(name, teacher, no_tool, out)
        runs[name] = [{k: r.get(k) for k in KEYS} for r in records if "eval/accuracy" in r]
        all_equal[name] = all_equal_fraction(records)
    from opd.tasks.arithmetic import word_templates
    from opd.config import ArithmeticTaskConfig
    setting = {"command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} PYTHONPATH=. python "
                          f"experiments/tool_env/run.py {out}",
               "machine": machine(),
               "minutes_after_sft": (time.time() - after_sft) / 60, "width": WIDTH, "sft_steps": SFT_STEPS, "sft_batch": SFT_BATCH,
               "sft_problems": SFT_PROBLEMS, "eval_problems": EVAL_PROBLEMS, "steps": STEPS,
               "templates": len(word_templates(ArithmeticTaskConfig(**TASK))),
               "sft_minutes": {m.name: float((m / "sft_minutes.txt").read_text()) for m in (teacher, no_tool)}}
    results = {"setting": setting, "models": models, "runs": runs, "groups_all_equal_frac": all_equal}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (here / "results.json").write_text(json.dumps(results, indent=1))
    write_results(results, here / "RESULTS.md")
    print(json.dumps(results, indent=1))
