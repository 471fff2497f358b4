"""A rank that hangs is caught by the step watchdog: the block fails in bounded time naming that
rank, nothing of the hung step is committed, and a rerun resumes from the last commit."""

from __future__ import annotations

import json
import time

import pytest

from ckpt import CheckpointStore

from .support import run_baton

pytestmark = pytest.mark.integration

LOOP = ["--loop", "tests.tasks.loops:hangs_on_rank_1", "--workers", "2", "--epochs", "1", "--epochs-per-block", "1",
        "--checkpoint-every-steps", "1", "--max-failures", "0", "--block-retries", "0"]
TIMEOUT_S = 8


def test_a_rank_that_hangs_fails_the_block_naming_it_and_the_rerun_resumes_from_the_last_commit(
        cluster_env, workdir):
    store, marker = str(workdir / "ckpts"), workdir / "hung-at"
    options = json.dumps({"hang_at": 3, "hang_file": str(marker)})
    out = run_baton(["train", "--store", store, "--lineage", "hung", *LOOP, "--step-timeout-s", str(TIMEOUT_S),
                     "--options", options], cluster_env, workdir, timeout=600)
    ended = time.time()
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert "rank 1 (at " in text and "hangs_on_rank_1" in text and "did not reach step 3" in text, text[-3000:]
    assert ended - float(marker.read_text()) < TIMEOUT_S + 30
    committed = CheckpointStore(store).list("hung")
    assert [m.step for m in committed] == [1, 2]  # nothing of the hung step
    again = run_baton(["train", "--store", store, "--lineage", "hung", *LOOP], cluster_env, workdir, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "resuming hung from 000000-0000000002" in again.stdout + again.stderr
    assert CheckpointStore(store).latest("hung").epochs_done == 1
