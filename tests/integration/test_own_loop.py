"""Your own loop on Ray Train (2 workers, gloo), through `baton train`: exact resume with loader
worker processes, two optimizers and a GradScaler; the language-model example; Ray Data."""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from pathlib import Path

import pytest

from ckpt import CheckpointStore

from .support import kill_group, run_baton, start_baton, wait_for

pytestmark = pytest.mark.integration

USER = ["--loop", "tests.tasks.loops:two_optimizers", "--workers", "2", "--epochs", "3", "--epochs-per-block", "1",
        "--checkpoint-every-steps", "3", "--options", json.dumps({"step_seconds": 0.15})]
STEPS_PER_EPOCH = 16  # 256 samples, 2 ranks, batch size 8


def _train(args: list[str], env, cwd: Path, extra_env: dict | None = None):
    out = run_baton(["train", *args], dict(env, **(extra_env or {})), cwd, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
    return out


def _entries(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("rank*.jsonl")) for line in f.read_text().splitlines()]


def test_a_user_loop_killed_at_five_random_moments_ends_bit_identical_and_sees_each_sample_once(
        cluster_env, workdir):
    store = str(workdir / "ckpts")
    _train(["--store", store, "--lineage", "straight", *USER], cluster_env, workdir)
    samples = workdir / "samples"
    args = ["train", "--store", store, "--lineage", "killed", *USER, "--sample-log", str(samples)]
    rng, kills = random.Random(20261128), 0
    while kills < 5:
        committed = len(CheckpointStore(store).list("killed"))
        proc = start_baton(args, cluster_env, workdir, workdir / f"attempt{kills}.log")
        try:
            wait_for(lambda: len(CheckpointStore(store).list("killed")) > committed or proc.poll() is not None,
                     300, "a new checkpoint")
            time.sleep(rng.uniform(0.0, 1.2))
        finally:
            kill_group(proc)
        kills += 1
    _train(["--store", store, "--lineage", "killed", *USER, "--sample-log", str(samples)], cluster_env, workdir)
    st = CheckpointStore(store)
    final, expected = st.latest("killed"), st.latest("straight")
    assert final.step == expected.step == 3 * STEPS_PER_EPOCH
    assert final.digest == expected.digest
    by_batch = defaultdict(list)
    for e in _entries(samples):
        by_batch[(e["epoch"], e["batch"], e["rank"])].append(e["indices"])
    assert all(all(ix == seen[0] for ix in seen) for seen in by_batch.values())
    for epoch in range(3):
        seen = sorted(i for (ep, _, _), runs in by_batch.items() if ep == epoch for i in runs[-1])
        assert seen == list(range(256)), f"epoch {epoch}: not every sample exactly once"


def test_leaving_the_loader_position_out_of_a_mid_epoch_resume_changes_the_result(cluster_env, workdir):
    store = str(workdir / "ckpts")
    base = ["--store", store, *USER[:-2], "--epochs", "1"]
    _train(["--lineage", "straight", *base], cluster_env, workdir)
    fail = json.dumps({"epoch": 0, "batch": 10, "rank": 1})
    _train(["--lineage", "control", *base, "--fail", fail, "--block-retries", "1"], cluster_env, workdir,
           {"BATON_FAULT_OMIT_STATE": "loader"})
    st = CheckpointStore(store)
    assert st.fs.exists(st.path("control", "_faults", "batch-0-10-0"))
    assert st.latest("control").digest != st.latest("straight").digest


def test_the_language_model_example_learns_on_two_workers_and_a_mid_epoch_kill_resumes_exactly(
        cluster_env, workdir):
    store = str(workdir / "ckpts")
    lm = ["--loop", "examples.lm:train_loop", "--workers", "2", "--epochs", "2", "--epochs-per-block", "2",
          "--checkpoint-every-steps", "4", "--options", json.dumps({"windows": 512, "context": 32, "width": 64})]
    root = Path(__file__).resolve().parents[2]  # examples/ is importable from the folder baton runs in
    _train(["--store", store, "--lineage", "lm", *lm], cluster_env, root)
    fail = json.dumps({"action": "kill-worker", "epoch": 1, "batch": 6, "rank": 1})
    _train(["--store", store, "--lineage", "lm-killed", *lm, "--fail", fail], cluster_env, root)
    st = CheckpointStore(store)
    assert st.fs.exists(st.path("lm-killed", "_faults", "batch-1-6-0"))
    epochs = [m for m in st.list("lm") if m.position.epoch_complete]
    assert epochs[-1].metrics["loss"] < epochs[0].metrics["loss"]
    assert epochs[-1].metrics["val_loss"] < epochs[0].metrics["val_loss"]
    assert st.latest("lm-killed").digest == st.latest("lm").digest


def test_a_ray_data_loop_resumes_exactly_at_epoch_ends_and_an_interrupted_epoch_restarts(cluster_env, workdir):
    store = str(workdir / "ckpts")
    data = ["--loop", "tests.tasks.loops:ray_data", "--datasets", json.dumps({"train": "tests.tasks.loops:numbers"}),
            "--workers", "2", "--epochs", "2", "--checkpoint-every-steps", "2"]
    _train(["--store", store, "--lineage", "one", *data, "--epochs-per-block", "2"], cluster_env, workdir)
    fail = json.dumps({"epoch": 1, "batch": 5, "rank": 0})
    out = _train(["--store", store, "--lineage", "split", *data, "--epochs-per-block", "1", "--fail", fail],
                 cluster_env, workdir)
    st = CheckpointStore(store)
    # Ray Data keeps no position: only epoch ends are committed, the failed epoch 1 ran again from its start.
    assert all(m.position.epoch_complete for m in st.list("split"))
    assert "resuming split from 000000-" in out.stderr
    assert st.latest("split").digest == st.latest("one").digest


def test_more_workers_than_the_cluster_holds_fail_in_bounded_time_naming_the_resources(cluster_env, workdir):
    started = time.monotonic()
    out = run_baton(["train", "--store", str(workdir / "ckpts"), "--lineage", "toobig", "--workers", "5",
                     "--resources-timeout-s", "2", "--block-retries", "0"], cluster_env, workdir, timeout=300)
    assert out.returncode != 0
    assert "needs 5 workers x (1 CPU, 0 GPU) but the Ray cluster has 4 CPU of the 5 needed" in out.stdout + out.stderr
    assert time.monotonic() - started < 120
