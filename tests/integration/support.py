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


def warm_groups_alive(env: dict, lineage: str) -> tuple[int, int]:
    """(WarmGroup actors of `lineage` alive, placement groups in use) on the test cluster."""
    # GCS queries only: the test cluster runs without the dashboard that the state API needs.
    code = ("import ray, json\n"
            f"ray.init(address={env['RAY_ADDRESS']!r}, log_to_driver=False)\n"
            "names = [a['name'] for a in ray.util.list_named_actors(all_namespaces=True)]\n"
            f"actors = [n for n in names if n.startswith('baton-warm-{lineage}-')]\n"
            "groups = [g for g in ray.util.placement_group_table().values() if g['state'] == 'CREATED']\n"
            "print(json.dumps([len(actors), len(groups)]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))
