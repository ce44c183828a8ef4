"""What a run leaves behind (DESIGN.md §6), readable without opd:

    config.yaml        the resolved configuration
    metrics.jsonl      one JSON object per optimizer step (plus step 0: the evaluation before training)
    events.*           TensorBoard events (tensorboard --logdir RUN_DIR)
    rollouts/step_N.jsonl  sampled completions with per-token teacher KL
    checkpoints/       see opd.learner.checkpoint
    summary.json       written at the end
    .lock              held (fcntl.flock) by the process running in the directory: its pid, host, command
"""

from __future__ import annotations

import errno
import json
import math
import os
import shlex
import socket
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from opd.config import RunConfig


class RunDirectoryError(RuntimeError):
    pass


class MetricsFileError(RunDirectoryError):
    """A line in the middle of a JSONL file (metrics.jsonl) that is not a JSON object: the file is damaged."""


class TornLineWarning(UserWarning):
    """The last line of a JSONL file was cut short (a crash, power loss or a full disk while it was written)."""


# ----------------------------------------------------------------------------------------------
# One process per run directory


class RunLock:
    """An exclusive lock on a run directory, so that two processes never write one run.

        with RunLock(run_dir):          # or: lock = RunLock(run_dir).acquire(); ...; lock.release()
            ...

    An OS file lock (`fcntl.flock`, non-blocking) on run_dir/.lock: the OS releases it when the
    holder exits in any way, kill -9 included, so a lock file left behind never blocks. The holder
    writes its pid, host and command line into the file; a second acquirer (in this process or
    another) gets a RunDirectoryError naming them. The file itself is never removed (removing it
    would let two processes lock two different files of the same name).
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        import fcntl

        if self._fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe_holder(os.pread(fd, 65536, 0))
            os.close(fd)
            raise RunDirectoryError(
                f"{self.run_dir} is in use by another opd process ({holder}): two runs in one directory would "
                f"interleave metrics.jsonl and overwrite each other's checkpoints. Wait for it to finish, stop it, "
                f"or choose another run_dir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(sys.argv),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        import fcntl

        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # no stale holder description for the next reader
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass


def _describe_holder(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode())
        where = "" if info.get("host") == socket.gethostname() else f" on {info.get('host')}"
        me = " (this same process)" if info.get("pid") == os.getpid() and not where else ""
        return f"pid {info['pid']}{where}{me}, running `{info.get('command', '?')}` since {info.get('since', '?')}"
    except (ValueError, KeyError, TypeError):  # the holder has not written its details yet
        return "a process that is just starting"


# ----------------------------------------------------------------------------------------------
# Reading metrics.jsonl (and any JSONL opd writes)


def _parse_jsonl(path: Path) -> list[tuple[bytes, dict]]:
    """(raw line, row) for every non-blank line. A last line that does not parse is torn: skipped
    with a TornLineWarning. A bad line before the last one raises MetricsFileError."""
    lines = [(number, raw) for number, raw in enumerate(Path(path).read_bytes().split(b"\n"), start=1)
             if raw.strip(b" \t\r\x00")]
    rows = []
    for i, (number, raw) in enumerate(lines):
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if i == len(lines) - 1:
                warnings.warn(f"{path}:{number}: the last line is incomplete (cut short by a crash or a full "
                              f"disk?): skipped", TornLineWarning, stacklevel=3)
                break
            raise MetricsFileError(f"{path}:{number}: not a JSON object ({err}), and not the last line: the file "
                                   f"is damaged: {raw[:80]!r}") from None
        rows.append((raw, row))
    return rows


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of metrics.jsonl (or of any JSONL file opd writes), oldest first. A torn last line
    is skipped with a warning (TornLineWarning); a damaged line elsewhere raises MetricsFileError,
    naming the file and the line."""
    return [row for _, row in _parse_jsonl(Path(path))]


def truncate_metrics(path: str | Path, step: int) -> None:
    """Keep only the rows of steps <= `step` (and drop a torn last line): resuming from the
    checkpoint of `step` then logs every later step exactly once. Rewritten atomically."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TornLineWarning)  # a torn line is dropped here on purpose
        kept = [raw for raw, row in _parse_jsonl(path) if not isinstance(row.get("step"), int) or row["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(raw.rstrip(b"\r") + b"\n" for raw in kept))
    os.replace(tmp, path)


def _clean(value):
    """JSON has no NaN/inf: write null instead so every line parses everywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLog:
    def __init__(self, cfg: RunConfig, resume_step: int | None, restart: bool = False):
        """`resume_step`: the step of the checkpoint a run resumes from (later rows are dropped);
        `restart`: `--resume` of a run that crashed before its first checkpoint starts it again
        from step 0 (its rows are dropped)."""
        self.path = Path(cfg.run_dir)
        self.metrics_path = self.path / "metrics.jsonl"
        if restart:
            resume_step = -1
        if resume_step is None and self.metrics_path.exists() and self.metrics_path.stat().st_size > 0:
            raise RunDirectoryError(f"{self.path} already holds a run (metrics.jsonl is not empty): pass --resume "
                                    f"to continue it, or choose another run_dir")
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.yaml").write_text(cfg.to_yaml())
        if resume_step is not None and self.metrics_path.exists():
            # rows written after the checkpoint we resume from would be repeated: drop them (and a torn line)
            truncate_metrics(self.metrics_path, resume_step)
        # unbuffered: a write that fails (the disk full) leaves nothing behind to fail again at exit
        self._metrics = self.metrics_path.open("ab", buffering=0)

        self.tensorboard = None
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = max(resume_step + 1, 0) if resume_step is not None else None
            self.tensorboard = SummaryWriter(str(self.path), purge_step=purge)
        self.wandb = None
        if cfg.log.wandb:
            try:
                import wandb
            except ImportError:
                raise RunDirectoryError("log.wandb=true needs the wandb package: pip install 'opd[wandb]'") from None
            self.wandb = wandb.init(project=cfg.log.wandb_project, name=self.path.name, dir=str(self.path),
                                    config=cfg.model_dump(mode="json"), resume="allow")

    @contextmanager
    def _writing(self, what: str, step: int | None = None):
        """A failed write (the disk full) is one line naming the file, not a traceback from deep
        inside a writer; the checkpoints already written are untouched."""
        try:
            yield
        except OSError as err:
            full = err.errno in (errno.ENOSPC, errno.EDQUOT)
            reason = "no space left on the device" if full else f"{type(err).__name__}: {err}"
            at = f" at step {step}" if step is not None else ""
            raise RunDirectoryError(f"could not write {what} in {self.path}{at}: {reason}. The run stopped; the "
                                    f"checkpoints written so far are intact: free space, then run the same command "
                                    f"with --resume") from None

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self._writing("metrics.jsonl", step):
            line = (json.dumps(row) + "\n").encode()
            while line:  # a raw write may take only part of it
                line = line[self._metrics.write(line):]
        with self._writing("the TensorBoard events", step):
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    if self.tensorboard is not None:
                        self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def logged_evals(self) -> list[dict]:
        """The evaluations already in metrics.jsonl, oldest first, each with its `step` (for the
        summary of a resumed run)."""
        rows = read_metrics(self.metrics_path) if self.metrics_path.is_file() else []
        return [{"step": r["step"], **{k: v for k, v in r.items() if k.startswith("eval/")}} for r in rows
                if any(k.startswith("eval/") for k in r)]

    def write_rollouts(self, step: int, records: list[dict]) -> Path:
        folder = self.path / "rollouts"
        folder.mkdir(exist_ok=True)
        path = folder / f"step_{step:06d}.jsonl"
        with self._writing(f"rollouts/{path.name}", step):
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return path

    def write_summary(self, summary: dict) -> None:
        """summary.json, with the machine the run ran on (its torch threads, CPU and bf16 capability)."""
        from opd.hardware import machine_record

        summary["machine"] = machine_record()
        with self._writing("summary.json"):
            (self.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def close(self) -> None:
        with self._writing("metrics.jsonl"):
            self._metrics.close()
        if self.tensorboard is not None:
            with self._writing("the TensorBoard events"):
                self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


class QuietLog(RunLog):
    """What a rank other than 0 has instead of a RunLog when several processes train one run
    (torchrun): it reads the run directory (earlier evaluations, for a resumed run's summary) but
    writes nothing; rank 0's RunLog writes it."""

    def __init__(self, cfg: RunConfig, resume_step: int | None, restart: bool = False):
        self.path = Path(cfg.run_dir)
        self.metrics_path = self.path / "metrics.jsonl"

    def log(self, step: int, metrics: dict) -> None:
        pass

    def write_rollouts(self, step: int, records: list[dict]) -> None:
        return None

    def write_summary(self, summary: dict) -> None:
        pass

    def close(self) -> None:
        pass
