"""Preemption in one process (`run_local`): a notice becomes a checkpoint of the exact step, the
block ends with `Preempted`, and the rerun repeats no step."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import pytest

from ckpt import CheckpointStore
from tasks.errors import Preempted
from tasks.runtime.stop import give_notice, withdraw_notice

from .test_loop import _train

SLOW = dict(loop="tests.tasks.loops:two_optimizers", epochs=2, epochs_per_block=1,
            options={"step_seconds": 0.03, "num_workers": 0})


def _notice_after(store: Path, lineage: str, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, give_notice, args=(CheckpointStore(str(store)), lineage, 0, "test"))
    timer.start()
    return timer


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_notice_mid_epoch_commits_that_step_and_the_rerun_repeats_no_step(tmp_path, mode):
    straight, _ = _train(tmp_path, "straight", checkpoint_mode=mode, **SLOW)
    log = tmp_path / "samples"
    _notice_after(tmp_path, "noticed", 0.6)
    with pytest.raises(Preempted, match=r"preempted at epoch 0 step (\d+) \(step\); checkpoint 000000-\d+ committed; "
                                        "a rerun or Retry resumes there") as err:
        _train(tmp_path, "noticed", checkpoint_mode=mode, sample_log=str(log), **SLOW)
    st = CheckpointStore(str(tmp_path))
    stopped = st.latest("noticed")
    assert f"step {stopped.step} " in str(err.value) and not stopped.position.epoch_complete
    withdraw_notice(st, "noticed", 0)
    resumed, _ = _train(tmp_path, "noticed", checkpoint_mode=mode, sample_log=str(log), **SLOW)
    assert resumed.digest == straight.digest
    batches = Counter((e["epoch"], e["batch"]) for e in map(json.loads, (log / "rank0.jsonl").read_text().splitlines()))
    assert set(batches.values()) == {1}, "a batch was trained twice"
    assert len(batches) == 2 * 32


def test_a_notice_on_an_epochs_last_batch_stops_right_after_the_epoch_end_commit(tmp_path):
    with pytest.raises(Preempted, match=r"preempted at epoch 0 step 8 \(end of epoch\); checkpoint 000000-0000000008"):
        _train(tmp_path, "end", loop="tests.tasks.loops:notice_on_last_batch", epochs=2)
    committed = CheckpointStore(str(tmp_path)).list("end")
    assert [(m.epoch, m.position.epoch_complete) for m in committed] == [(0, True)]


def test_without_ctx_loader_a_notice_stops_at_once_and_says_where_the_rerun_resumes(tmp_path):
    give_notice(CheckpointStore(str(tmp_path)), "plain", 0, "test")
    with pytest.raises(Preempted, match="before the first checkpoint; a rerun or Retry starts over"):
        _train(tmp_path, "plain", loop="tests.tasks.loops:plain_loader", epochs=1)


def test_baton_preempt_gives_the_lease_holder_notice_and_refuses_when_nobody_trains(tmp_path):
    from typer.testing import CliRunner

    from ckpt import Lease
    from flows.cli import app
    from tasks.runtime.stop import notice_path

    st = CheckpointStore(str(tmp_path))
    assert CliRunner().invoke(app, ["preempt", str(tmp_path), "idle"]).exit_code == 1
    with Lease(st, "busy", owner="test run") as lease:
        out = CliRunner().invoke(app, ["preempt", str(tmp_path), "busy", "--reason", "spot notice"])
        assert out.exit_code == 0, out.output
        assert st.fs.exists(notice_path(st, "busy", lease.fence))
        assert json.loads(st.fs.cat_file(notice_path(st, "busy", lease.fence)))["reason"] == "spot notice"


def test_workers_whose_flow_process_died_commit_the_step_they_are_at_and_stop(tmp_path):
    import subprocess
    import sys

    from flows.config import TrainConfig
    from tasks.runtime.worker import run_local

    # A flow process that took the lease and died without releasing it (SIGKILL leaves it so).
    code = ("import sys; from ckpt import CheckpointStore, Lease; "
            f"print(Lease(CheckpointStore({str(tmp_path)!r}), 'orphan', owner='doomed').acquire())")
    fence = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    config = TrainConfig(store=str(tmp_path), lineage="orphan", workers=1, **SLOW)
    # The vote of step 1 is read at step 2 (it runs during the step, not before it).
    with pytest.raises(Preempted, match="preempted at epoch 0 step 2 "):
        run_local(config.blocks(fence=fence)[0])
    assert CheckpointStore(str(tmp_path)).latest("orphan").step == 2


SAVING = """
import sys
from ckpt import CheckpointStore
from flows.config import TrainConfig
from flows.signals import on_signals
from tasks.runtime.worker import run_local

store, lineage = sys.argv[1], sys.argv[2]
config = TrainConfig(store=store, lineage=lineage, loop="bench.preempt:loop", epochs=1, workers=1,
                     checkpoint_every_steps=4, options={"width": 3072, "batch": 8, "batches": 200})
with on_signals(CheckpointStore(store), lineage, 0):
    run_local(config.blocks()[0])
"""


@pytest.mark.slow
def test_a_second_sigterm_during_the_save_exits_at_once_and_leaves_the_store_whole(tmp_path):
    """A loop with ~380 MB of state, so that a save takes long enough to be caught writing its
    files: the first SIGTERM gives notice, the second comes while a checkpoint's files are written
    and its manifest is not."""
    import os
    import signal
    import subprocess
    import sys
    import time

    st, lineage, log = CheckpointStore(str(tmp_path)), "twice", tmp_path / "run.log"
    proc = subprocess.Popen([sys.executable, "-c", SAVING, str(tmp_path), lineage], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 240
        while not st.list(lineage):  # a committed checkpoint to fall back to
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        before = [m.id for m in st.list(lineage)]
        os.kill(proc.pid, signal.SIGTERM)
        while not st.uncommitted(lineage):  # the next save is writing its files
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.01)
        writing = set(st.uncommitted(lineage))
        os.kill(proc.pid, signal.SIGTERM)
        sent = time.monotonic()
        proc.wait(30)
        exited_s = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM and "second signal: exiting now" in text, text[-3000:]
    assert exited_s < 2.0, f"the second SIGTERM took {exited_s:.2f} s to end the process"
    committed = [m.id for m in st.list(lineage)]
    assert not writing & set(committed), f"the save interrupted by the second SIGTERM got committed: {writing}"
    assert committed[: len(before)] == before and st.verify_lineage(lineage) == []
    assert set(st.uncommitted(lineage)) == writing  # left for cleanup (uncommitted_ttl), never listed
