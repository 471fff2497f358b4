"""Helpers for integration tests: `baton` as a real process, and store inspection."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ckpt import CheckpointStore

BATON = str(Path(sys.executable).parent / "baton")


def run_baton(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([BATON, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def start_baton(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start `baton` in its own process group, so the whole group can be killed at once."""
    return subprocess.Popen([BATON, *args], env=env, cwd=cwd, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {what}:\n{log.read_text()[-4000:] if log else ''}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def listing(store: str, lineage: str, env: dict[str, str], cwd: Path) -> list[dict]:
    out = run_baton(["ckpt", "ls", store, "--lineage", lineage, "--json"], env, cwd, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def epochs_committed(store: str, lineage: str) -> list[int]:
    return [m.epoch for m in CheckpointStore(store).list(lineage) if m.position.epoch_complete]
