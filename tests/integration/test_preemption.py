"""Preemption through `baton train`: SIGTERM becomes a checkpoint of the step the workers are at,
the process exits promptly, and the rerun trains no step twice."""

from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from ckpt import CheckpointStore

from .support import run_baton, start_baton, wait_for

pytestmark = pytest.mark.integration

ARGS = ["--recipe", "tests.integration.recipes:slow_drill", "--workers", "2", "--epochs", "4",
        "--epochs-per-block", "2", "--checkpoint-every-steps", "4", "--warm-idle-timeout-s", "10"]


def _train(store: str, lineage: str, env, cwd: Path, *extra: str) -> str:
    out = run_baton(["train", "--store", store, "--lineage", lineage, *ARGS, *extra], env, cwd, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
    return out.stdout + out.stderr


def test_sigterm_at_five_random_moments_commits_the_step_and_the_rerun_trains_no_step_twice(cluster_env, workdir):
    store, samples = str(workdir / "ckpts"), workdir / "samples"
    _train(store, "straight", cluster_env, workdir)
    st, rng = CheckpointStore(store), random.Random(20261128)
    args = ["train", "--store", store, "--lineage", "noticed", *ARGS, "--sample-log", str(samples)]
    stopped_with_checkpoint = 0
    for attempt in range(5):
        committed = len(st.list("noticed"))
        log = workdir / f"attempt{attempt}.log"
        proc = start_baton(args, cluster_env, workdir, log)
        wait_for(lambda: len(st.list("noticed")) > committed or proc.poll() is not None, 300, "a new checkpoint")
        time.sleep(rng.uniform(0.0, 1.5))
        noticed = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        text = log.read_text()
        if proc.returncode == 0:
            break  # training finished before the signal landed
        assert time.monotonic() - noticed < 60, "the process did not exit promptly after SIGTERM"
        if "preempted at epoch" in text:
            stopped_with_checkpoint += 1
            assert "a rerun or Retry resumes there" in text
    _train(store, "noticed", cluster_env, workdir, "--sample-log", str(samples))
    assert stopped_with_checkpoint >= 3, "SIGTERM rarely became a checkpoint"
    assert st.latest("noticed").digest == st.latest("straight").digest
    entries = [json.loads(line) for f in samples.glob("rank*.jsonl") for line in f.read_text().splitlines()]
    trained = Counter((e["epoch"], e["batch"], e["rank"]) for e in entries)
    assert set(trained.values()) == {1}, f"steps trained twice: {[k for k, n in trained.items() if n > 1]}"
    assert len(trained) == 4 * 8 * 2
