"""Fault points: armed from BATON_FAULTS (drills, other processes) or `faults.inject` (tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt import CheckpointStore, InjectedFault, InvalidFault, RetentionPolicy, faults, prune

from .test_store import commit

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("value, says", [
    ("nowhere=kill", "unknown fault point 'nowhere'"),
    ("delete.after_uncommit=explode", "must be 'kill' or 'raise'"),
    ("delete.after_uncommit=kill@0", ">= 1"),
    ("delete.after_uncommit=kill@x", ">= 1"),
    ("delete.after_uncommit", "must be 'kill' or 'raise'"),
])
def test_a_malformed_setting_fails_the_cleanup_before_it_deletes_anything(tmp_path, monkeypatch, value, says):
    store = CheckpointStore(str(tmp_path / "store"))
    for epoch in range(3):
        commit(store, "run", epoch, epoch + 1)
    monkeypatch.setenv(faults.ENV, value)
    with pytest.raises(InvalidFault, match=says) as caught:
        prune(store, RetentionPolicy(keep_last=1))
    assert faults.ENV in str(caught.value)
    assert len(store.list("run")) == 3


def test_raise_fires_on_the_nth_visit_and_a_rerun_finishes_the_job(tmp_path, monkeypatch):
    store = CheckpointStore(str(tmp_path / "store"))
    for epoch in range(5):
        commit(store, "run", epoch, epoch + 1)
    monkeypatch.setenv(faults.ENV, "delete.after_uncommit=raise@3")
    with pytest.raises(InjectedFault, match="delete.after_uncommit"):
        prune(store, RetentionPolicy(keep_last=1))
    assert len(store.list("run")) == 2  # two deleted, the third un-committed when it fired
    assert list(store.uncommitted("run").values()) == [float("inf")]  # known as a deletion in progress
    monkeypatch.delenv(faults.ENV)
    prune(store, RetentionPolicy(keep_last=1))
    assert [m.epoch for m in store.list("run")] == [4] and store.uncommitted("run") == {}


def test_kill_sigkills_the_process_at_the_point(tmp_path):
    store = CheckpointStore(str(tmp_path / "store"))
    for epoch in range(3):
        commit(store, "run", epoch, epoch + 1)
    code = ("import sys; from ckpt import CheckpointStore, RetentionPolicy, prune; "
            "prune(CheckpointStore(sys.argv[1]), RetentionPolicy(keep_last=1))")
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{faults.ENV: "delete.after_uncommit=kill@2"})
    done = subprocess.run([sys.executable, "-c", code, store.url], env=env, cwd=ROOT, capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert [m.epoch for m in store.list("run")] == [2]
    assert list(store.uncommitted("run").values()) == [float("inf")]


def test_inject_runs_a_callable_at_the_point_only_inside_the_block(store):
    seen = []
    manifest = commit(store, "run", 0, 1)
    with faults.inject("delete.after_uncommit", lambda: seen.append(store.list("run"))):
        store.delete("run", manifest.id)
    assert seen == [[]]
    again = commit(store, "run", 0, 1)
    store.delete("run", again.id)
    assert seen == [[]]


def test_an_unknown_point_cannot_be_injected():
    with pytest.raises(InvalidFault, match="unknown fault point"):
        with faults.inject("nowhere"):
            pass


def test_every_point_is_documented_and_reached_by_the_library():
    source = "".join(p.read_text() for p in (ROOT / "ckpt").glob("*.py") if p.name != "faults.py")
    for name, doc in faults.POINTS.items():
        assert doc and f'fault_point("{name}")' in source
