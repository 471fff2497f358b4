"""Exact resume (DESIGN invariant 7): interrupted runs end bit-identical to an uninterrupted one.

Runs train the drill recipe (dropout, momentum, a scheduler, custom state) on 2 workers, committing
every 3 steps as well as at every epoch's end: 6 epochs in blocks of 3, or for the random-kill
chain, 16 epochs in blocks of 4 of a slower variant.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from pathlib import Path

import pytest

from ckpt import CheckpointStore, decode

from .support import kill_group, run_baton, start_baton, wait_for

pytestmark = pytest.mark.integration

INTERVAL = 3
COMMON = ["--workers", "2", "--checkpoint-every-steps", str(INTERVAL)]
SHORT = ["--recipe", "tests.integration.recipes:drill", "--epochs", "6", "--epochs-per-block", "3", *COMMON]
LONG = ["--recipe", "tests.integration.recipes:slow_drill", "--epochs", "16", "--epochs-per-block", "4", *COMMON]
BATCHES_PER_EPOCH = 8  # 128 samples, 2 ranks, batch size 8


def _train(store: str, lineage: str, env, cwd: Path, *extra: str, config=SHORT):
    out = run_baton(["train", "--store", store, "--lineage", lineage, *config, *extra], env, cwd, timeout=500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
    return out


def _final(store: str, lineage: str):
    st = CheckpointStore(store)
    manifest = st.latest(lineage)
    state = decode({name: st.read(manifest, name) for name in manifest.files})
    return manifest, state


def _uninterrupted(env, work: Path, config, epochs: int):
    store = str(work / "ckpts")
    _train(store, "baseline", env, work, config=config)
    manifest, state = _final(store, "baseline")
    assert manifest.epochs_done == epochs and manifest.step == epochs * BATCHES_PER_EPOCH
    return manifest, state


@pytest.fixture(scope="module")
def baseline(cluster_env, tmp_path_factory):
    """The uninterrupted 6-epoch run that interrupted ones must equal."""
    return _uninterrupted(cluster_env, tmp_path_factory.mktemp("baseline"), SHORT, 6)


@pytest.fixture(scope="module")
def long_baseline(cluster_env, tmp_path_factory):
    return _uninterrupted(cluster_env, tmp_path_factory.mktemp("long-baseline"), LONG, 16)


def _entries(log_dir: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(log_dir.glob("rank*.jsonl")) for line in f.read_text().splitlines()]


def _assert_each_sample_once_per_epoch(entries: list[dict]) -> None:
    by_key = defaultdict(list)
    for e in entries:
        by_key[(e["epoch"], e["batch"], e["rank"])].append(e["indices"])
    # A batch trained again after a resume holds exactly the same samples as the first time.
    assert all(all(ix == seen[0] for ix in seen) for seen in by_key.values())
    for epoch in range(max(e["epoch"] for e in entries) + 1):
        samples = [i for (ep, _, _), seen in by_key.items() if ep == epoch for i in seen[-1]]
        assert sorted(samples) == list(range(128)), f"epoch {epoch}: not every sample exactly once"


def test_a_run_killed_at_ten_random_moments_ends_bit_identical_to_an_uninterrupted_run(
        long_baseline, cluster_env, workdir):
    store, samples = str(workdir / "ckpts"), workdir / "samples"
    args = ["train", "--store", store, "--lineage", "chain", *LONG, "--sample-log", str(samples)]
    rng, kills, snapshots = random.Random(20261127), 0, []
    while kills < 10:
        committed = len(CheckpointStore(store).list("chain"))
        log = workdir / f"attempt{kills}.log"
        proc = start_baton(args, cluster_env, workdir, log)
        try:
            # Wait for progress, then kill at a random moment: mid-step, mid-write, between blocks.
            wait_for(lambda: len(CheckpointStore(store).list("chain")) > committed or proc.poll() is not None,
                     240, "a new checkpoint", None, None)
            time.sleep(rng.uniform(0.0, 0.9))
        finally:
            kill_group(proc)
            snapshots.append(len(_entries(samples)) if samples.exists() else 0)
        kills += 1
        latest = CheckpointStore(store).latest("chain")
        if latest is not None and latest.epochs_done == 16:
            break  # training finished before this kill landed
    _train(store, "chain", cluster_env, workdir, "--sample-log", str(samples), config=LONG)
    manifest, state = _final(store, "chain")
    base_manifest, base_state = long_baseline
    assert kills >= 10, f"only {kills} kills landed before training finished"
    assert manifest.digest == base_manifest.digest
    assert state.extra["user"]["steps"] == base_state.extra["user"]["steps"] == 16 * BATCHES_PER_EPOCH
    assert (state.extra["user"]["ema"] == base_state.extra["user"]["ema"]).all()
    assert state.scheduler == base_state.scheduler
    entries = _entries(samples)
    _assert_each_sample_once_per_epoch(entries)
    lost = _work_lost_per_kill(entries, snapshots)
    print(f"\nwork lost per kill (optimizer steps, rank 0): {lost}; checkpoint interval {INTERVAL} steps")
    assert max(lost) <= INTERVAL


def _work_lost_per_kill(entries: list[dict], snapshots: list[int]) -> list[int]:
    """Steps rank 0 had started before each kill, beyond the point the next attempt resumed from."""
    rank0 = [(i, e) for i, e in enumerate(entries) if e["rank"] == 0]
    attempts = []
    for i, e in rank0:
        if not attempts or attempts[-1][0] != e["attempt"]:
            attempts.append((e["attempt"], []))
        attempts[-1][1].append((i, (e["epoch"], e["batch"])))
    lost = []
    for (_, done), (_, after) in zip(attempts, attempts[1:]):
        resume_at = after[0][1]
        kill_index = min((s for s in snapshots if s > done[0][0]), default=len(entries))
        lost.append(sum(1 for i, pos in done if i < kill_index and pos >= resume_at))
    return lost


def test_the_equality_test_bites_when_the_rng_state_is_left_out_of_the_restore(baseline, cluster_env, workdir):
    store = str(workdir / "ckpts")
    env = dict(cluster_env, BATON_FAULT_OMIT_STATE="rng")
    # Cold blocks: a warm worker group carries its RNG in memory from one block to the next.
    _train(store, "omit", env, workdir, "--no-warm-workers")
    manifest, _ = _final(store, "omit")
    assert manifest.digest != baseline[0].digest


def test_a_worker_killed_mid_epoch_recovers_inside_its_block_exactly(baseline, cluster_env, workdir):
    store = str(workdir / "ckpts")
    fail = json.dumps({"action": "kill-worker", "epoch": 1, "batch": 5, "rank": 1})
    out = _train(store, "workerkill", cluster_env, workdir, "--fail", fail, "--max-failures", "1",
                 "--block-retries", "0")
    st = CheckpointStore(store)
    assert st.fs.exists(st.path("workerkill", "_faults", "batch-1-5-0"))  # the worker really was killed
    assert "Retry" not in out.stderr  # Ray Train restarted the worker group inside the task
    manifest, _ = _final(store, "workerkill")
    assert manifest.digest == baseline[0].digest


def test_a_block_that_raises_is_retried_by_prefect_and_resumes_mid_block_exactly(baseline, cluster_env, workdir):
    store = str(workdir / "ckpts")
    fail = json.dumps({"action": "raise", "epoch": 4, "batch": 6, "rank": 0})
    out = _train(store, "taskretry", cluster_env, workdir, "--fail", fail, "--max-failures", "0",
                 "--block-retries", "1")
    # Prefect ran block 1 twice: its start line is there twice (Prefect's own retry lines go to the log file).
    assert out.stderr.count("block 1: training taskretry epochs 3-5") == 2, out.stderr[-3000:]
    assert "resuming taskretry from 000004-" in out.stderr  # mid-block: inside epoch 4
    manifest, _ = _final(store, "taskretry")
    assert manifest.digest == baseline[0].digest


def test_a_kill_while_a_checkpoint_is_being_written_leaves_it_uncommitted_and_resume_is_exact(
        baseline, cluster_env, workdir):
    store = str(workdir / "ckpts")
    fail = json.dumps({"action": "kill-worker", "phase": "commit", "epoch": 2, "batch": 7})
    _train(store, "midwrite", cluster_env, workdir, "--fail", fail, "--max-failures", "1", "--block-retries", "0")
    st = CheckpointStore(store)
    assert st.fs.exists(st.path("midwrite", "_faults", "commit-2-7-0"))
    manifest, _ = _final(store, "midwrite")
    assert manifest.digest == baseline[0].digest
    assert st.verify_lineage("midwrite") == []
