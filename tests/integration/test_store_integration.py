"""The store under real training: the single-writer lease across processes, and S3."""

from __future__ import annotations

import json

import pytest

from ckpt import CheckpointStore, Lease

from .support import epochs_committed, kill_group, run_baton, start_baton, wait_for

pytestmark = pytest.mark.integration


def test_two_concurrent_runs_on_one_lineage_one_fails_naming_the_holder_and_a_later_run_takes_over(
        cluster_env, workdir):
    store = str(workdir / "ckpts")
    args = ["train", "--store", store, "--lineage", "contested", "--epochs", "6", "--epochs-per-block", "2"]
    log = workdir / "holder.log"
    holder = start_baton(args, cluster_env, workdir, log)
    try:
        record = wait_for(lambda: Lease.current(CheckpointStore(store), "contested"), 120, "the lease", holder, log)
        second = run_baton(args, cluster_env, workdir, timeout=120)
        assert second.returncode != 0
        assert "is being trained by" in second.stderr and record.owner in second.stderr
        assert "Requesting resources" not in second.stderr  # it failed before any work
        wait_for(lambda: 0 in epochs_committed(store, "contested"), 240, "the first checkpoint", holder, log)
    finally:
        kill_group(holder)
    # The holder's process is gone: its lease is stale at once on this host, and the run resumes.
    out = run_baton(args, cluster_env, workdir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "took over the lease" in out.stderr
    manifests = CheckpointStore(store).list("contested")
    assert [m.epoch for m in manifests if m.position.epoch_complete] == [0, 1, 2, 3, 4, 5]
    assert max(m.fence for m in manifests) > record.fence


@pytest.mark.s3
def test_training_on_the_s3_store_completes_and_resumes_like_the_local_store(cluster_env, s3_env, s3_store, workdir):
    env = dict(cluster_env, **s3_env)
    store = f"{s3_store}/runs"
    first = run_baton(["train", "--store", store, "--lineage", "ons3", "--epochs", "2", "--json"], env, workdir)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = run_baton(["train", "--store", store, "--lineage", "ons3", "--epochs", "4", "--json"], env, workdir)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    summary = json.loads(second.stdout[second.stdout.index("{"):])
    assert summary["epochs_trained"] == 2
    assert "from checkpoint 000001-" in second.stderr
    assert epochs_committed(store, "ons3") == [0, 1, 2, 3]
    verify = run_baton(["ckpt", "verify", store], env, workdir)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert secret_not_in(env["AWS_SECRET_ACCESS_KEY"], first.stdout + first.stderr + second.stdout + second.stderr)


def secret_not_in(secret: str, text: str) -> bool:
    return secret not in text
