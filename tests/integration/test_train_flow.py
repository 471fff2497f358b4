"""The train flow end to end: real `baton` processes, a real Ray cluster and Prefect server."""

from __future__ import annotations

import json

import pytest

from ckpt import CheckpointStore

from .support import epochs_committed, kill_group, listing, run_baton, start_baton, wait_for

pytestmark = pytest.mark.integration


def _flow_run_state(api_url: str, flow_run_id: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{api_url}/flow_runs/{flow_run_id}", timeout=10) as response:
        return json.loads(response.read())["state"]["type"]


def test_two_workers_four_epochs_in_blocks_of_two_commit_four_checkpoints_with_falling_loss(
        cluster_env, prefect_server, workdir):
    store = str(workdir / "ckpts")
    out = run_baton(["train", "--store", store, "--lineage", "demo", "--epochs", "4", "--epochs-per-block", "2",
                     "--workers", "2", "--json"], cluster_env, workdir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["epochs_trained"] == 4 and summary["blocks_trained"] == 2
    items = listing(store, "demo", cluster_env, workdir)
    assert [it["epoch"] for it in items] == [0, 1, 2, 3]
    losses = [it["metrics"]["loss"] for it in items]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0]
    assert {"lineage", "id", "epoch", "step", "uri", "metrics", "created_at", "digest"} <= set(items[0])
    # The flow run is Completed on the shared Prefect server, with a log line per epoch.
    run_ids = {line.split("/runs/flow-run/")[1].split()[0] for line in out.stderr.splitlines() if "/runs/flow-run/" in line}
    assert run_ids and all(_flow_run_state(prefect_server, rid) == "COMPLETED" for rid in run_ids)
    assert sum("end of epoch" in line and "loss" in line for line in out.stderr.splitlines()) == 4

    again = run_baton(["train", "--store", store, "--lineage", "demo", "--epochs", "4", "--json"], cluster_env, workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout[again.stdout.index("{"):])["epochs_trained"] == 0
    assert "nothing to train" in again.stderr and "Requesting resources" not in again.stderr
    assert listing(store, "demo", cluster_env, workdir) == items


def test_a_run_killed_after_its_epoch_one_checkpoint_resumes_without_training_any_epoch_twice(cluster_env, workdir):
    store = str(workdir / "ckpts")
    log = workdir / "first.log"
    args = ["train", "--store", store, "--lineage", "killed", "--epochs", "4", "--epochs-per-block", "2"]
    proc = start_baton(args, cluster_env, workdir, log)
    try:
        wait_for(lambda: 1 in epochs_committed(store, "killed"), 240, "the epoch-1 checkpoint", proc, log)
    finally:
        kill_group(proc)
    before = {m.id: m.created_at for m in CheckpointStore(store).list("killed")}
    out = run_baton(args, cluster_env, workdir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    after = CheckpointStore(store).list("killed")
    assert [m.epoch for m in after if m.position.epoch_complete] == [0, 1, 2, 3]
    # Nothing committed before the kill was rewritten, and every epoch has exactly one checkpoint.
    assert all(m.created_at == before[m.id] for m in after if m.id in before)
    assert len(after) == 4
    assert "block 0: killed already has" in out.stderr


def test_the_digits_recipe_reaches_ninety_percent_validation_accuracy(cluster_env, workdir):
    store = str(workdir / "ckpts")
    out = run_baton(["train", "--store", store, "--recipe", "tasks.recipes:digits", "--lineage", "digits",
                     "--epochs", "6", "--epochs-per-block", "6", "--json"], cluster_env, workdir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    final = json.loads(out.stdout[out.stdout.index("{"):])["final"]
    assert final["metrics"]["val_accuracy"] >= 0.90, final["metrics"]
