"""Warm worker groups: a lineage's workers outlive a block; any break falls back to a fresh group
from the store, bit-identical, and nothing of a dead flow's group is left behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ckpt import CheckpointStore

from .support import warm_groups_alive as _alive, kill_group, run_baton, start_baton, wait_for

pytestmark = pytest.mark.integration

DIGITS = ["--recipe", "tests.integration.recipes:drill", "--workers", "2", "--epochs", "4",
          "--checkpoint-every-steps", "3"]
PIDS = re.compile(r"block (\d+) trained on (a new worker group|the warm worker group, no restart) \(worker pids ([\d, ]+)\)")


def _train(store: str, lineage: str, env, cwd: Path, *extra: str):
    out = run_baton(["train", "--store", store, "--lineage", lineage, *DIGITS, *extra], env, cwd, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
    return out.stdout + out.stderr


def test_four_blocks_run_on_the_same_worker_processes_and_end_bit_identical_to_cold_and_single_block_runs(
        cluster_env, workdir):
    store = str(workdir / "ckpts")
    warm = _train(store, "warm", cluster_env, workdir, "--epochs-per-block", "1")
    cold = _train(store, "cold", cluster_env, workdir, "--epochs-per-block", "1", "--no-warm-workers")
    _train(store, "one", cluster_env, workdir, "--epochs-per-block", "4")
    blocks = PIDS.findall(warm)
    assert [int(b[0]) for b in blocks] == [0, 1, 2, 3], warm[-3000:]
    assert blocks[0][1] == "a new worker group" and all(b[1].startswith("the warm") for b in blocks[1:])
    assert len({b[2] for b in blocks}) == 1, f"worker processes changed between blocks: {blocks}"
    assert not PIDS.findall(cold), "--no-warm-workers still used a warm group"
    st = CheckpointStore(store)
    assert st.latest("warm").digest == st.latest("cold").digest == st.latest("one").digest
    assert wait_for(lambda: _alive(cluster_env, "warm") == (0, 0), 60, "the finished run's group to end")


@pytest.mark.parametrize("moment", ["between-blocks", "mid-block"])
def test_a_flow_killed_falls_back_to_a_fresh_group_exactly_and_leaves_nothing_behind(
        cluster_env, workdir, moment):
    store = str(workdir / "ckpts")
    lineage = f"killed-{moment}"
    args = ["train", "--store", store, "--lineage", lineage, *DIGITS, "--epochs-per-block", "1",
            "--warm-idle-timeout-s", "5"]
    proc = start_baton(args, cluster_env, workdir, workdir / "killed.log")
    st = CheckpointStore(store)

    def ready() -> bool:
        ends = [m for m in st.list(lineage) if m.position.epoch_complete]
        if moment == "between-blocks":
            return len(ends) >= 1 and ends[-1].epoch == 0
        return any(m.epoch == 1 and not m.position.epoch_complete for m in st.list(lineage))
    try:
        wait_for(ready, 400, f"the moment {moment}", proc, workdir / "killed.log")
    finally:
        kill_group(proc)
    # The dead flow's group idles out (5 s) and takes its workers and placement group with it.
    wait_for(lambda: _alive(cluster_env, lineage) == (0, 0), 120, "the dead flow's group to end")
    rerun = _train(store, lineage, cluster_env, workdir, "--epochs-per-block", "1")
    assert "a new worker group" in rerun
    _train(store, "reference", cluster_env, workdir, "--epochs-per-block", "4")
    assert st.latest(lineage).digest == st.latest("reference").digest
