"""Chaos test: random faults during real `opd` runs, then `--resume`; nothing may be lost.

    .venv/bin/python scripts/chaos.py --trials 12 --seed 0      # or: make chaos  (5-10 min on 2 cores)
    .venv/bin/python scripts/chaos.py --trials 4 --methods sft,midtrain --out runs/chaos

Each trial picks a method and a fault (seeded), runs `opd <method>` on tiny models as a subprocess
and injects the fault:
  kill9       SIGKILL after a random step, sometimes while a checkpoint is being written  -> rc -9
  sigint      one Ctrl-C: the step finishes, a checkpoint of it is saved                  -> rc 130
  sigint2     two Ctrl-C 50 ms apart: stops at once, without saving this step            -> rc 130
  disk_full   the run directory is a small tmpfs (mounted here, as root) that fills up during a
              checkpoint; without root, RLIMIT_FSIZE makes a large write fail      -> rc != 0, one-line error
  slow_server the teacher is served (a scoring server in this process, the same tiny teacher) and,
              from a random step on, sends its answers one byte at a time          -> rc 2, one-line error
  bad_answer  the served teacher answers a random step with a NaN log-prob         -> rc 2, one-line error
              (both: the checkpoint of the last finished step is saved; the server is healed, then
              --resume; distill and rl only, compared with an uninterrupted run on the healthy server)
Then it resumes (`--resume`, no fault, at most 3 times) and checks: `checkpoints/latest` names a
loadable checkpoint with finite weights, metrics.jsonl holds steps 0..N exactly once (no torn line),
and the final weights equal an uninterrupted run's (bit for bit; computed once per method under
OUT/baseline). A summary table is printed and written as JSON to OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

ROOT = Path(__file__).resolve().parent.parent
OPD = ROOT / ".venv" / "bin" / "opd"
STEPS, TIMEOUT = 6, 300
TINY = ["student.tiny.hidden_size=32", "student.tiny.seed=1", "teacher.tiny.hidden_size=64", "teacher.tiny.seed=2",
        "teacher.tiny.pretrain_steps=0", "task.train_size=64", "task.eval_size=4", "train.prompts_per_step=4",
        "sampling.samples_per_prompt=2", "sampling.max_new_tokens=12", "log.progress=false",
        "log.tensorboard=false", "eval.every=0", f"train.steps={STEPS}"]
METHOD_ARGS = {"distill": ["task.name=arithmetic"], "rl": ["task.name=arithmetic"], "sft": ["task.name=arithmetic"],
               "midtrain": ["task.name=knowledge", "task.knowledge.people=4", "data.max_seq_tokens=64"]}
FAULTS = ["kill9", "sigint", "sigint2", "disk_full", "slow_server", "bad_answer"]
SERVED_FAULTS = ("slow_server", "bad_answer")  # the teacher served over HTTP; distill and rl only
CHILDREN: list[subprocess.Popen] = []
MOUNTS: list[Path] = []


class ScoringServer:
    """TINY's teacher served in vLLM's shapes on 127.0.0.1 (/health, /v1/models, /tokenize,
    /detokenize, /v1/completions with prompt_logprobs), each sequence scored on its own so the
    answers do not depend on batching. `fault` (slow | bad) applies from scoring request
    `fault_from` on: slow sends the answer one byte every 0.2 s, bad gives a NaN log-prob."""

    def __init__(self):
        import torch.nn.functional as F

        from opd.config import TinyModelConfig
        from opd.tiny import build_tiny_model, build_tiny_tokenizer

        self.tokenizer = build_tiny_tokenizer()
        self.model = build_tiny_model(TinyModelConfig(hidden_size=64, seed=2, pretrain_steps=0), self.tokenizer).eval()
        self.fault, self.fault_from, self.scored = None, 0, 0
        self.lock, self.healed = threading.Lock(), threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.reply(200, {"data": [{"id": "chaos-teacher"}]} if self.path == "/v1/models" else {})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                tok = server.tokenizer
                if self.path == "/tokenize":
                    ids = tok.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
                    return self.reply(200, {"tokens": ids, "count": len(ids), "max_model_len": 512})
                if self.path == "/detokenize":
                    if max(body["tokens"], default=0) >= len(tok):
                        return self.reply(400, {"error": {"message": "token id out of vocabulary"}})
                    return self.reply(200, {"prompt": tok.decode(body["tokens"])})
                with server.lock:
                    server.scored += 1
                    fault = server.fault if server.scored >= server.fault_from else None
                prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
                choices = [{"index": i, "prompt_logprobs": server.score(ids, nan=fault == "bad")}
                           for i, ids in enumerate(prompts)]
                data = json.dumps({"choices": choices}).encode()
                if fault != "slow":
                    return self.reply(200, {"choices": choices})
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    for i in range(len(data)):
                        if server.healed.wait(0.2):
                            return
                        self.wfile.write(data[i:i + 1])
                        self.wfile.flush()
                except OSError:  # opd hung up at its deadline, as it should
                    pass

        self.F = F
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *args: None
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @torch.no_grad()
    def score(self, ids, nan=False):
        logprobs = self.F.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), -1)
        entries = [None] + [{str(ids[j]): {"logprob": logprobs[j - 1, ids[j]].item()}} for j in range(1, len(ids))]
        if nan:
            entries[-1][str(ids[-1])]["logprob"] = float("nan")
        return entries

    def break_at(self, fault: str | None, request: int) -> None:
        with self.lock:
            self.fault, self.fault_from, self.scored = fault, request, 0
        self.healed.clear()

    def heal(self) -> None:
        self.break_at(None, 0)
        self.healed.set()


SERVER: ScoringServer | None = None


def served_args() -> list[str]:
    """The run's teacher on the scoring server: one request per step (and per evaluation), a short
    whole-request deadline, a short retry window."""
    global SERVER
    if SERVER is None:
        SERVER = ScoringServer()
    return [f"teacher.url={SERVER.url}", "teacher.rows_per_request=64", "teacher.timeout_s=3",
            "teacher.retry_for_s=4", "teacher.tiny=null"]


def launch(method, run_dir, every, out: Path, resume=False, preexec=None, extra=()) -> subprocess.Popen:
    cmd = [str(OPD), method, *TINY, *METHOD_ARGS[method], *extra, f"checkpoint.every={every}", f"run_dir={run_dir}"]
    cmd += ["--resume"] if resume else []
    out.with_suffix(".cmd").write_text(" ".join(cmd) + "\n")
    proc = subprocess.Popen(cmd, stdout=open(out.with_suffix(".out"), "w"), stderr=open(out.with_suffix(".err"), "w"),
                            preexec_fn=preexec, cwd=ROOT)
    CHILDREN.append(proc)
    return proc


def finish(proc: subprocess.Popen, timeout=TIMEOUT) -> int | str:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return f"timeout after {timeout} s"


def metrics_steps(run_dir: Path) -> list[int]:
    """The step of every row of metrics.jsonl; a line that is not JSON raises ValueError."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_bytes().split(b"\n") if path.exists() else []
    if lines and lines[-1] == b"":
        lines.pop()
    steps = []
    for i, line in enumerate(lines, 1):
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"metrics.jsonl line {i} of {len(lines)} is not a JSON row: {line[:60]!r}") from None
    return steps


def latest(run_dir: Path) -> tuple[int, dict] | None:
    """(step, weights) of the checkpoint `latest` names, checked loadable and finite; None if none yet."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    ckpt = pointer.parent / pointer.read_text().strip()
    weights = load_safetensors((ckpt / "model" / "model.safetensors").read_bytes())  # no mmap: tmpfs unmounts
    bad = [k for k, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert not bad, f"{ckpt.name}: non-finite tensors {bad[:3]}"
    state = json.loads((ckpt / "trainer_state.json").read_text())  # the step alone: no tensors needed
    assert state["step"] == int(ckpt.name.split("_")[1]), f"{ckpt.name} holds step {state['step']}"
    return state["step"], weights


def poll(proc, cond, timeout=TIMEOUT, every=0.005) -> bool:
    """Wait until cond() holds (True) or the process exits (False)."""
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if cond():
            return True
        time.sleep(every)
    return False


def rows_at_least(run_dir, n):
    path = run_dir / "metrics.jsonl"
    return lambda: path.exists() and path.read_bytes().count(b"\n") >= n


def baseline(method: str, out: Path, served: bool = False) -> dict:
    """Final weights of an uninterrupted run (cached), the size of one checkpoint, seconds per step.
    `served`: with the teacher on the (healthy) scoring server."""
    base = out / "baseline" / (method + ("_served" if served else ""))
    extra = served_args() if served else []
    done = base / "run" / "checkpoints" / "latest"
    args = base / "args.json"
    key = json.dumps(TINY + METHOD_ARGS[method] + [e for e in extra if not e.startswith("teacher.url=")])
    if not done.exists() or not args.exists() or args.read_text() != key:
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        if served:
            SERVER.heal()
        rc = finish(launch(method, base / "run", 1, base / "run_log", extra=extra))
        assert rc == 0, f"baseline {method} failed (rc {rc}): see {base}/run_log.err"
        args.write_text(key)
    step, weights = latest(base / "run")
    ckpt = base / "run" / "checkpoints" / f"step_{step:06d}"
    size = sum(-(-p.stat().st_size // 4096) * 4096 for p in ckpt.rglob("*") if p.is_file())
    last = json.loads((base / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    return {"weights": weights, "ckpt_bytes": size, "step_s": last["wall_s_total"] / STEPS}


def inject(fault, method, run_dir: Path, tdir: Path, rng, base, every) -> dict:
    """Run with the fault; returns what happened and the problems seen."""
    info, problems = {"fault": fault}, []
    preexec = None
    if fault == "disk_full":
        room = 64 * 1024 + int(base["ckpt_bytes"] * rng.uniform(1.3, 2.8))
        run_dir.mkdir(parents=True)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room}", "tmpfs", str(run_dir)],
                          capture_output=True).returncode == 0:
            MOUNTS.append(run_dir)
            info["mechanism"] = f"tmpfs of {room} bytes"
        else:
            limit = int(base["ckpt_bytes"] * rng.uniform(0.35, 0.6))
            info["mechanism"] = f"RLIMIT_FSIZE {limit} bytes, SIGXFSZ ignored"

            def preexec():
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    at = rng.randint(2, STEPS - 1)  # metrics rows written before the fault: step 0 (eval) .. at-1
    extra = served_args() if fault in SERVED_FAULTS else []
    if extra:  # request 1 is the step-0 evaluation, request n + 1 step n's scoring
        info["when"] = f"scoring step {at}"
        SERVER.break_at("slow" if fault == "slow_server" else "bad", at + 1)
    proc = launch(method, run_dir, every, tdir / "fault", preexec=preexec, extra=extra)
    fired = True
    if fault == "kill9":
        during_ckpt = rng.random() < 0.4
        info["when"] = f"{'writing the first checkpoint after' if during_ckpt else 'soon after'} step {at - 1}"
        ckpts = run_dir / "checkpoints"
        fired = poll(proc, rows_at_least(run_dir, at))
        if fired and during_ckpt:
            fired = poll(proc, lambda: ckpts.exists() and any(ckpts.glob(".tmp_step_*")))
        elif fired:
            time.sleep(rng.uniform(0, 1.5 * base["step_s"]))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    elif fault in ("sigint", "sigint2"):
        info["when"] = f"after step {at - 1}"
        fired = poll(proc, rows_at_least(run_dir, at))
        time.sleep(rng.uniform(0, 1.5 * base["step_s"]))
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            if fault == "sigint2":
                time.sleep(0.05)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
    rc = finish(proc)
    if extra:
        SERVER.heal()  # the server is back for the resumes
    err = (tdir / "fault.err").read_text()
    info.update(rc=rc, stderr_tail=err.strip().splitlines()[-3:])
    summary = run_dir / "summary.json"
    done = summary.exists() and not json.loads(summary.read_text()).get("interrupted")
    if rc == 0 or (done and rc in (-signal.SIGINT, -signal.SIGKILL)):
        # the run had finished before the fault (a SIGINT then meets Python's default handler at exit):
        # nothing to check but the end state
        info["missed"] = True
        return {**info, "problems": problems}
    if not fired:
        problems.append(f"the run exited {rc} before the fault was injected")
    expected = {"kill9": -9, "sigint": 130, "sigint2": 130, "slow_server": 2, "bad_answer": 2}.get(fault)
    if expected is not None and rc != expected:
        problems.append(f"exit code {rc}, expected {expected}")
    if fault == "disk_full":
        lines = [l for l in err.splitlines() if l.startswith("error:")]
        info["cli_said"] = lines or err.strip().splitlines()[-1:]
        if rc in (0, 130) or not isinstance(rc, int) or len(lines) != 1:
            problems.append(f"expected a non-zero exit with one 'error:' line, got rc {rc} and a traceback ending "
                            f"{info['cli_said']}")
        elif "space" not in lines[0].lower() and "too large" not in lines[0].lower():
            problems.append(f"the error does not say the disk is full: {lines[0]}")
        if any((run_dir / "checkpoints").glob(".tmp_step_*")):
            problems.append("a partial checkpoint (.tmp_step_*) was left behind")
    if fault in SERVED_FAULTS:
        lines = [l for l in err.splitlines() if l.startswith("error:")]
        info["cli_said"] = lines or err.strip().splitlines()[-1:]
        if len(lines) != 1 or "Traceback" in err:
            problems.append(f"expected one 'error:' line, got {info['cli_said']}")
        elif ("timeout_s" if fault == "slow_server" else "not finite") not in lines[0]:
            problems.append(f"the error does not name the fault: {lines[0]}")
        if "saved checkpoint" not in err:
            problems.append("the error does not name the checkpoint it saved")
    try:
        ckpt = latest(run_dir)
        info["latest_after_fault"] = ckpt and ckpt[0]
        if fault in ("sigint", *SERVED_FAULTS):
            last = max(metrics_steps(run_dir))
            if ckpt is None or ckpt[0] != last:
                problems.append(f"{fault} after step {last}: latest is {ckpt and ckpt[0]}, not a checkpoint of it")
    except Exception as e:  # noqa: BLE001 — anything here is a finding
        problems.append(f"after the fault, latest is not loadable: {type(e).__name__}: {e}")
    return {**info, "problems": problems}


def trial(i, method, fault, out: Path, rng) -> dict:
    tdir = out / "trials" / f"{i:02d}_{method}_{fault}"
    shutil.rmtree(tdir, ignore_errors=True)
    tdir.mkdir(parents=True)
    run_dir = tdir / "run"
    served = fault in SERVED_FAULTS
    base = baseline(method, out, served)
    every = 1 if fault == "disk_full" else rng.choice([1, 2]) if not served else 50  # the failure alone saves
    result = {"trial": i, "method": method, "checkpoint_every": every, "dir": str(tdir),
              **inject(fault, method, run_dir, tdir, rng, base, every)}
    problems = result["problems"]
    if run_dir in MOUNTS:  # free the space again before resuming
        subprocess.run(["mount", "-o", "remount,size=256m", str(run_dir)], check=True)
    for attempt in range(1, 4):
        if result.get("missed"):
            break
        rc = finish(launch(method, run_dir, every, tdir / f"resume{attempt}", resume=True,
                           extra=served_args() if served else ()))
        result["resumes"] = attempt
        if rc == 0:
            break
        problems.append(f"--resume #{attempt} exited {rc}: {(tdir / f'resume{attempt}.err').read_text()[-300:]!r}")
    try:
        steps = metrics_steps(run_dir)
        if steps != list(range(STEPS + 1)):
            problems.append(f"metrics.jsonl steps are {steps}, expected 0..{STEPS} once each")
        ckpt = latest(run_dir)
        if ckpt is None or ckpt[0] != STEPS:
            problems.append(f"latest is step {ckpt and ckpt[0]}, expected {STEPS}")
        else:
            diffs = {k: (t - base["weights"][k]).abs().max().item() for k, t in ckpt[1].items()
                     if not torch.equal(t, base["weights"][k])}
            if diffs or ckpt[1].keys() != base["weights"].keys():
                worst = max(diffs.items(), key=lambda kv: kv[1]) if diffs else None
                problems.append(f"final weights differ from the uninterrupted run in {len(diffs)} tensors "
                                f"(largest: {worst}); keys equal: {ckpt[1].keys() == base['weights'].keys()}")
    except Exception as e:  # noqa: BLE001
        problems.append(f"final state unreadable: {type(e).__name__}: {e}")
    if run_dir in MOUNTS:
        shutil.copytree(run_dir, tdir / "run.saved")
        subprocess.run(["umount", str(run_dir)], check=False)
        MOUNTS.remove(run_dir)
    result["passed"] = not problems
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="distill,rl,sft,midtrain")
    ap.add_argument("--faults", default=",".join(FAULTS))
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "chaos")
    args = ap.parse_args()
    methods, faults = args.methods.split(","), args.faults.split(",")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OPD_CACHE", str(out / "opd_cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    rng = random.Random(args.seed)
    # balanced: len(methods) * len(faults) trials cover every pair once; the order is seeded
    ms, fs = rng.sample(methods, len(methods)), rng.sample(faults, len(faults))
    plan = [(ms[(i + i // len(fs)) % len(ms)], fs[i % len(fs)]) for i in range(args.trials)]
    teachers = [m for m in ms if m in ("distill", "rl")] or ["distill"]  # a served teacher scores these
    plan = [(m if f not in SERVED_FAULTS or m in teachers else teachers[i % len(teachers)], f)
            for i, (m, f) in enumerate(plan)]
    rng.shuffle(plan)
    start, results = time.time(), []
    try:
        for i, (method, fault) in enumerate(plan, 1):
            t = time.time()
            r = trial(i, method, fault, out, random.Random(f"{args.seed}-{i}"))
            r["seconds"] = round(time.time() - t, 1)
            results.append(r)
            status = "ok" if r["passed"] else "FAIL: " + " | ".join(r["problems"])
            extra = (f" ({r.get('mechanism', '')}; latest after it: {r.get('latest_after_fault')}; "
                     f"CLI said: {r.get('cli_said')})" if fault in ("disk_full", *SERVED_FAULTS) else "")
            print(f"[{i}/{len(plan)}] {method:8s} {fault:9s} {r.get('when', '')} rc={r['rc']} "
                  f"resumes={r.get('resumes', 0)}{' (fault missed)' if r.get('missed') else ''}{extra} "
                  f"{r['seconds']}s  {status}", flush=True)
    finally:
        for p in CHILDREN:
            if p.poll() is None:
                p.kill()
                p.wait()
        for m in MOUNTS:
            subprocess.run(["umount", str(m)], check=False)
    table = {}
    for r in results:
        cell = table.setdefault(r["method"], {}).setdefault(r["fault"], [0, 0])
        cell[0] += r["passed"]
        cell[1] += 1
    print(f"\n{'method':10s}" + "".join(f"{f:>11s}" for f in faults))
    for m in methods:
        print(f"{m:10s}" + "".join(f"{'%d/%d' % tuple(table.get(m, {}).get(f, (0, 0))):>11s}" for f in faults))
    failed = [r for r in results if not r["passed"]]
    kinds = len({r["fault"] for r in results if not r.get("missed")})
    wall = time.time() - start
    missed = sum(bool(r.get("missed")) for r in results)
    line = (f"{len(results)} trials ({missed} with the fault after the run's end), {kinds} kinds of fault, "
            + ("nothing lost" if not failed else f"{len(failed)} FAILED: trials {[r['trial'] for r in failed]}")
            + f" ({wall / 60:.1f} min)")
    print(line)
    (out / "summary.json").write_text(json.dumps(
        {"summary": line, "seed": args.seed, "wall_s": round(wall, 1), "steps": STEPS, "table": table,
         "trials": results}, indent=2, default=str) + "\n")
    print(f"written: {out / 'summary.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
