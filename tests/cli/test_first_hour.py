"""The first hour on a new machine (issue 26): what the CPU can run, threads, checks before loading."""

import copy
import json
import os
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from helpers import TINY_RUN, chat_ids, tiny
from opd import hardware
from opd.config import SamplingConfig, load_config
from opd.data import PromptDataError
from opd.loop import train
from opd.run_dir import RunDirectoryError
from opd.sampler.hf import HFSampler

PROMPTS = ["Describe the garden in a few words.", "Hi", "Write one sentence about the winter sea, please, now."]


def run_config(run_dir, *overrides):
    return load_config(None, [f"run_dir={run_dir}", *TINY_RUN, *overrides])


# ---- bf16 on a CPU without bf16 units


@pytest.mark.parametrize("packing", [False, True])
def test_bf16_sampling_without_onednn_bf16_packing_joins_products_unpacked(monkeypatch, packing):
    """On a CPU where oneDNN's bf16 path cannot run (AVX2 only: packing raises), the lean decoder still
    joins q/k/v and gate/up into one bf16 product each, applied unpacked, and samples the bf16 model's
    distribution. The capability check is forced off here, so this runs on every CPU; forced on only
    where the CPU really has it."""
    from opd.sampler.decoder import LeanDecoder
    from opd.teacher.hf import HFTeacher

    if packing and not hardware.bf16_packing():
        pytest.skip("this CPU cannot run oneDNN's bf16 path")
    monkeypatch.setattr(hardware, "bf16_packing", lambda: packing)
    model, tok = tiny(hidden=32, seed=4, init_std=0.2)
    bf16 = HFSampler(model, tok, SamplingConfig(samples_per_prompt=2, max_new_tokens=12), dtype=torch.bfloat16)
    r = bf16.sample(chat_ids(tok, PROMPTS), seed=3)
    assert bf16.decoder_class is LeanDecoder, bf16.lean_unsupported

    decoder = LeanDecoder(bf16.model, torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long), 2)
    qkv, o, gate_up, _ = decoder.products[0]
    assert qkv.packed is packing and gate_up.packed is packing and qkv.weight is not None
    attn = decoder.decoder.layers[0].self_attn
    x = torch.randn(3, 1, model.config.hidden_size, dtype=torch.bfloat16)
    torch.testing.assert_close(qkv(x), torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1))
    torch.testing.assert_close(o(x), attn.o_proj(x))

    own_forward = HFTeacher(copy.deepcopy(bf16.model), tok, chunk_size=8).score(r).logprobs
    mask = r.completion_mask.bool()
    assert mask.any()
    assert float((own_forward - r.behaviour_logprobs)[mask].abs().max()) < 0.1  # bf16 rounding only


def test_bf16_settings_on_a_cpu_without_bf16_units_warn_once_with_the_measured_slowdown(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "_warned", set())
    cfg = run_config(tmp_path / "run", "teacher.dtype=bfloat16", "sampling.dtype=bfloat16")
    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hardware.check_bf16(cfg, cpu) == []  # bf16 units: nothing to say

    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": False)
    with pytest.warns(hardware.SlowBf16Warning) as caught:
        assert hardware.check_bf16(cfg, cpu) == ["teacher.dtype=bfloat16", "sampling.dtype=bfloat16"]
    message = str(caught[0].message)
    assert "no bf16 units" in message and f"{hardware.bf16_slowdown():.0f}x the fp32 time" in message
    assert hardware.bf16_slowdown() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hardware.check_bf16(cfg, cpu) == []  # once per setting
    fp32 = run_config(tmp_path / "run", "train.compute_dtype=float32")
    assert hardware.bf16_settings(fp32) == []
    assert hardware.check_bf16(run_config(tmp_path / "run", "train.compute_dtype=bfloat16"), torch.device("meta")) == []


def test_cpu_flags_and_the_machine_record_are_read_from_this_machine():
    record = hardware.machine_record()
    assert set(record["flags"]) <= set(hardware.REPORTED_FLAGS) and set(record["flags"]) <= hardware.cpu_flags()
    assert record["native_bf16"] == bool(hardware.cpu_flags() & hardware.BF16_FLAGS)
    assert record["usable_cores"] >= 1 and record["threads"] == torch.get_num_threads()


# ---- threads


def test_threads_come_from_the_usable_cores_unless_set(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    assert hardware.usable_cores() == 6
    assert hardware.choose_threads(None) == 6
    assert hardware.choose_threads(None, processes_on_node=4) == 1  # torchrun: the node's cores shared
    assert hardware.choose_threads(3) == 3  # train.threads wins
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert hardware.choose_threads(None) == 2  # the user's environment wins over the default


def test_train_threads_is_applied_and_recorded_in_the_summary(tmp_path):
    before = torch.get_num_threads()
    try:
        summary = train(run_config(tmp_path / "run", "train.steps=1", "train.threads=1", "eval.teacher_accuracy=false"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["machine"]["threads"] == summary["machine"]["threads"] == 1
    assert written["machine"]["usable_cores"] == hardware.usable_cores()


# ---- checks before any model loads


def test_a_missing_prompts_file_and_a_used_run_dir_are_refused_before_the_models_load(tmp_path):
    """The student here does not exist: had it been loaded first, the error would name it."""
    missing_student = f"student.path={tmp_path / 'no-such-model'}"
    base = [f"run_dir={tmp_path / 'run'}", missing_student, "teacher.tiny.hidden_size=32", "log.tensorboard=false"]
    with pytest.raises(PromptDataError, match="data.prompts: file not found: .*nothing.jsonl"):
        train(load_config(None, [*base, f"data.prompts={tmp_path / 'nothing.jsonl'}"]))
    (tmp_path / "run").mkdir(exist_ok=True)  # the lock file is there already
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        train(load_config(None, base))
    from opd.models import ModelNotFoundError

    with pytest.raises(ModelNotFoundError):  # with --resume the check passes, and the model is looked for
        train(load_config(None, base), resume=True)


# ---- README commands as written


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_commands() -> list[str]:
    """The command lines of README.md's bash blocks (continuation lines joined)."""
    commands, block = [], None
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            block = [] if line.strip() == "```bash" and block is None else None
            continue
        if block is not None and line.strip() and not line.lstrip().startswith("#"):
            if commands and commands[-1].endswith("\\"):
                commands[-1] = commands[-1][:-1] + " " + line.strip()
            else:
                commands.append(line.strip())
    return commands


def test_no_readme_command_needs_an_activated_environment():
    commands = readme_commands()
    torchrun = [c for c in commands if "torchrun" in c]
    assert len(torchrun) >= 4
    assert not [c for c in commands if "$(which" in c]
    assert all(c.startswith(".venv/bin/torchrun ") and " .venv/bin/opd " in c for c in torchrun), torchrun


def test_the_readme_torchrun_line_runs_as_written(tmp_path):
    """The first torchrun line of the README, run from a folder whose .venv is this environment, with a
    tiny run.yaml and 2 processes instead of 4."""
    line = next(c for c in readme_commands() if "torchrun" in c).split("#")[0]
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    settings = [*TINY_RUN, "train.steps=1", "eval.teacher_accuracy=false", f"run_dir={tmp_path / 'run'}"]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(_nested(settings)))
    env = {**os.environ, "PYTHONPATH": str(README.parent)}
    done = subprocess.run(shlex.split(line.replace("--nproc-per-node 4", "--nproc-per-node 2")), cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps_done"] == 1


def _nested(overrides: list[str]) -> dict:
    out: dict = {}
    for item in overrides:
        key, value = item.split("=", 1)
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = yaml.safe_load(value)
    return out


# ---- the same model as student and teacher


def test_distilling_a_model_from_itself_warns(tmp_path):
    from opd.components import build
    from opd.same_model import SameModelWarning, logits_agree

    def built(*overrides):
        build(load_config(None, [f"run_dir={tmp_path / 'run'}", *TINY_RUN, "data.eval_holdout=4", *overrides])).close()

    same = ["teacher.tiny.hidden_size=32", "teacher.tiny.seed=1", "teacher.tiny.pretrain_steps=0"]
    with pytest.warns(SameModelWarning, match="name the same model"):
        built(*same)
    # another path holding the same weights: caught by the logits (a bf16 copy too)
    model, tok = tiny(hidden=32, seed=3)
    for name in ("m1", "m2"):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    with pytest.warns(SameModelWarning, match="same logits"):
        built(f"student.path={tmp_path / 'm1'}", f"teacher.path={tmp_path / 'm2'}", "student.tiny=null",
              "teacher.tiny=null")
    assert logits_agree(model, copy.deepcopy(model).to(torch.bfloat16), len(tok))
    assert not logits_agree(model, tiny(hidden=32, seed=4)[0], len(tok))
    with warnings.catch_warnings():  # a different teacher, or a method that does not distill: no warning
        warnings.simplefilter("error", SameModelWarning)
        built()
        built(*same, "method=sft", "task.name=arithmetic", "task.train_size=16", "task.eval_size=4")


# ---- progress without a terminal


def test_off_a_terminal_progress_is_a_line_at_a_steady_interval(monkeypatch):
    import io

    from rich.console import Console

    from opd.progress import LineProgress, stage_progress

    out = io.StringIO()
    console = Console(file=out, width=200)
    assert not console.is_terminal and isinstance(stage_progress("distill", console), LineProgress)
    clock = iter([0.0, 10.0, 20.0, 31.0, 40.0, 70.0])
    monkeypatch.setattr("opd.progress.time.monotonic", lambda: next(clock))
    with LineProgress("distill", console, every_s=30) as progress:
        task = progress.add_task("distill", total=4, status="")  # t=0
        progress.update(task, completed=1, status="teacher KL 0.5")  # t=10: not yet
        progress.update(task, completed=2, status="teacher KL 0.4")  # t=20: not yet
        progress.update(task, completed=3, status="teacher KL 0.3")  # t=31: a line
        progress.update(task, completed=3)  # t=40: not yet (9 s after the last line)
        progress.update(task, completed=4, status="teacher KL 0.2")  # t=70: the end
    lines = out.getvalue().splitlines()
    assert lines == ["distill: step 3/4 (75%), 10.3 s/step, 10s left  teacher KL 0.3",
                     "distill: step 4/4 (100%), 17.5 s/step, 1m 10s in all  teacher KL 0.2"]


def test_a_run_off_a_terminal_prints_its_steps(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    monkeypatch.setenv("OPD_PROGRESS_INTERVAL_S", "0")
    out = io.StringIO()
    train(run_config(tmp_path / "run", "train.steps=2", "log.progress=true", "eval.teacher_accuracy=false"),
          console=Console(file=out, width=200))
    text = out.getvalue()
    assert "distill: step 1/2 (50%)" in text and "left" in text and "distill: step 2/2 (100%)" in text
    assert "teacher KL" in text
