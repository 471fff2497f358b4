"""`baton train` in a terminal, stopped the ways a person stops it: Ctrl-C (SIGINT to the terminal's
foreground process group) at any moment, Ctrl-C twice, SIGTERM during start-up, the terminal
closed (SIGHUP). Each ends within seconds, with no traceback, leaving no process of the run (the
temporary Prefect server, Ray's GCS, raylet and workers, the warm group) and a store that verifies;
the rerun after all of them ends bit-identical to a run that never stopped.

Each trial is a real `baton train` with its own temporary Prefect server and local Ray (what a
person gets), in a pseudo-terminal whose session leader is a small shell: the command runs as its
foreground job, and a closed terminal reaches it as bash passes it on. One lineage is stopped
again and again; each trial resumes what the last one left.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ckpt import CheckpointStore
from flows._process import descendants

from .support import BATON, run_baton

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A job-control shell's part, as small as it gets: session leader of the terminal, the command its
# foreground job; on hang-up it sends SIGHUP to the job's process group. It writes the job's pid,
# then its exit status, to STATUS, and holds the session a while after the job ends (when a session
# leader exits, the kernel sends SIGHUP to the foreground group: that would hide what the job left).
SHELL = r"""
import fcntl, os, signal, subprocess, sys, termios, time
status, command = sys.argv[1], sys.argv[2:]
os.setsid()
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
JOB_CONTROL = (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
for sig in JOB_CONTROL:
    signal.signal(sig, signal.SIG_IGN)

def foreground():
    os.setpgid(0, 0)
    os.tcsetpgrp(0, os.getpid())
    for sig in JOB_CONTROL:
        signal.signal(sig, signal.SIG_DFL)

job = subprocess.Popen(command, preexec_fn=foreground)
signal.signal(signal.SIGHUP, lambda *_: os.killpg(job.pid, signal.SIGHUP))
with open(status, "w") as f:
    f.write(f"{job.pid}\n")
code = job.wait()
with open(status, "a") as f:
    f.write(f"{time.time()} {code}\n")
time.sleep(15)
"""

ARGS = ["train", "--recipe", "tests.integration.recipes:slow_drill", "--workers", "2", "--epochs", "12",
        "--epochs-per-block", "4"]


def _started(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == b"Z" else fields[19].decode()  # start time: a pid reused is another process


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:160]
    except OSError:
        return "?"


class TerminalRun:
    """`baton ARGS` as the foreground job of a shell in a pseudo-terminal. Records, while it runs,
    every process whose parent chain leads to it."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path):
        self.status = cwd / f"status-{time.monotonic_ns()}"
        self.master, slave = os.openpty()
        self.shell = subprocess.Popen([sys.executable, "-c", SHELL, str(self.status), BATON, *args],
                                      stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd)
        os.close(slave)
        self.started = time.monotonic()
        self.output = bytearray()
        self.seen: dict[int, tuple[str, str]] = {}
        self._hang_up, self._done = threading.Event(), threading.Event()
        self._threads = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._track, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _read(self) -> None:
        while not self._hang_up.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # the slave side is closed: the shell ended
                    break
                if not chunk:
                    break
                self.output += chunk
        os.close(self.master)  # for a hang-up: the kernel sends SIGHUP to the session leader

    def _track(self) -> None:
        while not self._done.is_set():
            for pid in descendants(self.shell.pid):
                started = _started(pid)
                if started and pid not in self.seen:
                    self.seen[pid] = (started, _command(pid))
            time.sleep(0.05)

    @property
    def pid(self) -> int | None:
        try:
            return int(self.status.read_text().split()[0])
        except (OSError, IndexError, ValueError):
            return None

    def exited(self) -> tuple[float, int] | None:
        """(time.time() of the exit, status) once the command has ended."""
        lines = self.status.read_text().splitlines() if self.status.exists() else []
        if len(lines) < 2:
            return None
        at, code = lines[1].split()
        return float(at), int(code)

    def ctrl_c(self) -> float:
        with contextlib.suppress(ProcessLookupError):  # it ended first
            os.killpg(os.tcgetpgrp(self.master), signal.SIGINT)
        return time.time()

    def terminate(self) -> float:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        return time.time()

    def close_terminal(self) -> float:
        self._hang_up.set()
        return time.time()

    def wait(self, timeout_s: float) -> tuple[float, int]:
        deadline = time.monotonic() + timeout_s
        while (ended := self.exited()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"still running {timeout_s:g} s later:\n{self.text()[-3000:]}")
            time.sleep(0.05)
        return ended

    def text(self) -> str:
        return bytes(self.output).decode(errors="replace")

    def left_after(self, seconds: float) -> list[str]:
        """Processes of the run still alive `seconds` after it ended (none may be)."""
        deadline = time.monotonic() + seconds
        while True:
            alive = [f"{pid} {cmd}" for pid, (started, cmd) in self.seen.items()
                     if pid not in (self.shell.pid, self.pid) and _started(pid) == started]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.2)

    def close(self) -> None:
        self._done.set()
        self._hang_up.set()
        for pid, (started, _) in self.seen.items():  # whatever a failed assertion left
            if _started(pid) == started:
                os.kill(pid, signal.SIGKILL)
        self.shell.kill()
        self.shell.wait(10)


def _trial(env, cwd, store: str, lineage: str, stop, within_s: float = 30.0) -> tuple[str, int]:
    """One `baton train` stopped by `stop(run)` (which returns the time of its last signal):
    ended within `within_s` of it, no traceback, nothing left 5 s later, the store verifies."""
    run = TerminalRun([*ARGS, "--store", store, "--lineage", lineage], env, cwd)
    try:
        sent = stop(run)
        ended, code = run.wait(within_s + 5)
        text = run.text()
        assert ended - sent < within_s, f"ended {ended - sent:.1f} s after the signal:\n{text[-3000:]}"
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-5000:]
        assert run.left_after(5.0) == [], text[-2000:]
    finally:
        run.close()
    assert CheckpointStore(store).verify_lineage(lineage) == []
    return text, code


def _after(seconds: float, act):
    """Stop `seconds` after the command started."""
    def stop(run: TerminalRun) -> float:
        while run.pid is None or time.monotonic() - run.started < seconds:
            time.sleep(0.01)
        return act(run)
    return stop


def _after_commits(store: str, lineage: str, commits: int, delay_s: float, act):
    """Stop `delay_s` after this run's `commits`-th commit (or when the run ends first)."""
    def stop(run: TerminalRun) -> float:
        before = len(CheckpointStore(store).list(lineage))
        while len(CheckpointStore(store).list(lineage)) < before + commits and run.exited() is None:
            time.sleep(0.1)
        time.sleep(delay_s)
        return act(run)
    return stop


def _at_the_end(store: str, lineage: str, epochs: int, delay_s: float, act):
    """Stop `delay_s` after the lineage's last epoch was committed: while the run publishes its
    artifacts, prints its summary and shuts down."""
    def stop(run: TerminalRun) -> float:
        while run.exited() is None:
            latest = CheckpointStore(store).latest(lineage)
            if latest is not None and latest.epochs_done >= epochs:
                break
            time.sleep(0.05)
        time.sleep(delay_s)
        return act(run)
    return stop


def test_ctrl_c_sigterm_and_a_closed_terminal_at_any_moment_end_the_run_at_once_and_leave_nothing_running(
        cluster_env, base_env, workdir):
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    store, lineage = str(workdir / "ckpts"), "stopped"
    reference = run_baton([*ARGS, "--store", str(workdir / "ref"), "--lineage", "ref"], cluster_env, workdir)
    assert reference.returncode == 0, reference.stderr[-3000:]

    def trial(stop, within_s: float = 30.0) -> tuple[str, int]:
        return _trial(base_env, workdir, store, lineage, stop, within_s)

    for moment in sorted(rng.uniform(0.05, 3.0) for _ in range(5)):  # imports, the server's launch
        text, code = trial(_after(moment, TerminalRun.terminate), within_s=10)
        # Only in Python's own first milliseconds, before Baton's first line, is it Python's default.
        assert code == 128 + signal.SIGTERM or (code == -signal.SIGTERM and not text.strip()), (seed, moment, text)
    ctrl_c = [_after(rng.uniform(0.8, 3.0), TerminalRun.ctrl_c),  # imports: typer, pydantic, torch
              _after(rng.uniform(3, 10), TerminalRun.ctrl_c),  # the server and Ray starting
              _after_commits(store, lineage, 1, rng.uniform(0, 3), TerminalRun.ctrl_c),  # training
              _after_commits(store, lineage, 2, rng.uniform(0, 3), TerminalRun.ctrl_c)]
    for stop in ctrl_c:
        text, _ = trial(stop)
        assert _told_what_is_committed(text), (seed, text[-3000:])

    def twice(run: TerminalRun) -> float:
        _after_commits(store, lineage, 1, rng.uniform(0, 2), TerminalRun.ctrl_c)(run)
        time.sleep(rng.uniform(0.2, 2.0))
        return run.ctrl_c()

    text, code = trial(twice, within_s=5)
    assert code == 128 + signal.SIGINT and "second signal" in text, (seed, text[-3000:])
    trial(_after_commits(store, lineage, 1, rng.uniform(0, 3), TerminalRun.close_terminal))
    # The last one trains to the end: Ctrl-C lands while the run publishes, prints and shuts down.
    trial(_at_the_end(store, lineage, 12, rng.uniform(0, 2), TerminalRun.ctrl_c))

    rerun = run_baton([*ARGS, "--store", store, "--lineage", lineage], base_env, workdir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert run_baton(["ckpt", "verify", store], base_env, workdir).returncode == 0
    final, expected = CheckpointStore(store).latest(lineage), CheckpointStore(str(workdir / "ref")).latest("ref")
    assert (final.epochs_done, final.digest) == (expected.epochs_done, expected.digest), seed


def _told_what_is_committed(text: str) -> bool:
    return any(words in text for words in ("stopped during start-up, before training began", "preempted at epoch",
                                           "the latest committed checkpoint of", "has no committed checkpoint"))
