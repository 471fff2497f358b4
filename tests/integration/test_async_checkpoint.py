"""Asynchronous checkpoints (`--checkpoint-mode async`) in real training runs: exact like sync
mode, through a kill while a save is in flight, and loud when a background save fails.

Runs train the drill recipe (as in test_exact_resume) on 2 workers: 6 epochs in blocks of 3,
8 batches per epoch, a checkpoint every 3 steps and at every epoch's end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckpt import CheckpointStore, checkpoint_id
from ckpt.manifest import MANIFEST_NAME

from .support import run_baton

pytestmark = pytest.mark.integration

CONFIG = ["--recipe", "tests.integration.recipes:drill", "--epochs", "6", "--epochs-per-block", "3",
          "--workers", "2", "--checkpoint-every-steps", "3"]
ASYNC = ["--checkpoint-mode", "async"]


def _train(store: str, lineage: str, env, cwd: Path, *extra: str):
    return run_baton(["train", "--store", store, "--lineage", lineage, *CONFIG, *extra], env, cwd, timeout=500)


@pytest.fixture(scope="module")
def sync_run(cluster_env, tmp_path_factory):
    """The uninterrupted sync-mode run that async runs must equal."""
    work = tmp_path_factory.mktemp("sync")
    out = _train(str(work / "ckpts"), "sync", cluster_env, work)
    assert out.returncode == 0, out.stderr[-4000:]
    manifests = CheckpointStore(str(work / "ckpts")).list("sync")
    assert manifests[-1].epochs_done == 6
    return manifests


def test_an_async_run_killed_while_a_save_is_in_flight_resumes_from_the_last_commit_and_ends_like_sync(
        sync_run, cluster_env, workdir):
    store = str(workdir / "ckpts")
    # Rank 0's background save of the checkpoint after epoch 2, batch 7 (the first block's last)
    # SIGKILLs its process once the files are written and before the manifest is.
    fail = json.dumps({"action": "kill-worker", "phase": "commit", "epoch": 2, "batch": 7})
    out = _train(store, "async", cluster_env, workdir, *ASYNC, "--fail", fail, "--max-failures", "1",
                 "--block-retries", "0")
    assert out.returncode == 0, out.stderr[-4000:]
    st = CheckpointStore(store)
    assert st.fs.exists(st.path("async", "_faults", "commit-2-7-0"))  # the kill really happened
    killed = checkpoint_id(2, 24)
    last_before = checkpoint_id(2, 21)  # the last save committed before the kill
    assert f"resuming async from {last_before}" in out.stderr, out.stderr[-4000:]
    manifests = st.list("async")
    assert [m.id for m in manifests] == [m.id for m in sync_run]
    assert [m.digest for m in manifests] == [m.digest for m in sync_run]
    # Identical files too, and the same parent chain: async mode changes when bytes are written, not what.
    assert [{n: e.sha256 for n, e in m.files.items()} for m in manifests] == \
        [{n: e.sha256 for n, e in m.files.items()} for m in sync_run]
    assert [m.parent for m in manifests] == [m.parent for m in sync_run]
    assert killed in [m.id for m in manifests]  # re-trained and committed by the resumed workers
    assert st.verify_lineage("async") == []


def test_a_background_save_that_fails_fails_the_run_and_keeps_the_previous_checkpoint(
        sync_run, cluster_env, workdir):
    store = str(workdir / "ckpts")
    st = CheckpointStore(store)
    blocked = checkpoint_id(1, 16)  # the end of epoch 1
    # The storage refuses that checkpoint for real: a plain file sits where its folder must go, so
    # the background write fails with an OSError from the filesystem, after training moved on.
    Path(st.path("failing", blocked)).parent.mkdir(parents=True)
    Path(st.path("failing", blocked)).write_bytes(b"not a folder")
    out = _train(store, "failing", cluster_env, workdir, *ASYNC, "--max-failures", "0", "--block-retries", "0")
    assert out.returncode != 0
    assert "AsyncSaveFailed" in out.stderr and f"background save of checkpoint {blocked} failed" in out.stderr, \
        out.stderr[-4000:]
    manifests = st.list("failing")
    assert manifests[-1].id == checkpoint_id(1, 15)  # the last save before the failure
    assert [m.digest for m in manifests] == [m.digest for m in sync_run if m.id <= manifests[-1].id]
    assert st.verify_lineage("failing") == []
    assert not st.fs.exists(st.path("failing", blocked, MANIFEST_NAME))
