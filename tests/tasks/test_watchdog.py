"""The step watchdog: a rank that makes no progress is reported (where its main thread is) and
stopped; the report names the rank that hung, not the ones waiting for it."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch.multiprocessing as mp

from ckpt import CheckpointStore
from tasks.runtime.watchdog import (
    AUTO_FLOOR_S,
    NOTICE_FLOOR_S,
    STARTUP_ALLOWANCE_S,
    HangReport,
    StepTimeout,
    StepWatchdog,
    describe_hang,
    main_thread_position,
    read_reports,
)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _dog(tmp_path, clock, hung, timeout_s=10.0, noticed=lambda: False, rank=0):
    return StepWatchdog(CheckpointStore(str(tmp_path)), "l", 3, rank, timeout_s=timeout_s, noticed=noticed, on_hang=hung.append, clock=clock)


def test_the_timeout_allows_start_up_then_follows_the_slowest_step_with_a_floor():
    auto = StepTimeout(None)
    assert auto.seconds == STARTUP_ALLOWANCE_S
    for step_s in (0.5, 4.0, 1.0):
        auto.observe(step_s)
    assert auto.seconds == max(AUTO_FLOOR_S, 20 * 4.0)
    assert StepTimeout(7.0).seconds == 7.0


def test_beats_keep_the_watchdog_quiet_and_silence_past_the_timeout_reports_once(tmp_path):
    clock, hung = Clock(), []
    dog = _dog(tmp_path, clock, hung)
    for step in range(1, 20):
        clock.now += 9.0
        dog.beat(step)
        assert dog.check() is None
    clock.now += 10.5
    report = dog.check()
    assert report is not None and report.step == 19 and hung == [report]
    assert dog.check() is None and len(hung) == 1  # once
    assert [r.rank for r in read_reports(CheckpointStore(str(tmp_path)), "l", 3)] == [0]


def test_baton_s_own_long_phases_are_not_a_hang(tmp_path):
    clock, hung = Clock(), []
    dog = _dog(tmp_path, clock, hung)
    dog.beat(1)
    with dog.paused():
        clock.now += 600
        assert dog.check() is None
    clock.now += 5
    assert dog.check() is None and hung == []


def test_a_notice_during_a_hang_stops_the_rank_within_the_notice_grace(tmp_path):
    clock, hung, notice = Clock(), [], []
    dog = _dog(tmp_path, clock, hung, timeout_s=300, noticed=lambda: bool(notice))
    for step in range(1, 5):
        clock.now += 1.0
        dog.beat(step)
    clock.now += NOTICE_FLOOR_S + 1
    assert dog.check() is None  # no notice: the step timeout (300 s) holds
    notice.append(True)
    assert dog.check() is not None and hung


def test_the_notice_grace_is_three_slowest_steps_with_a_floor_and_never_above_the_timeout():
    timeout = StepTimeout(None)
    for step_s in (1.0, 8.0, 2.0):
        timeout.observe(step_s)
    assert timeout.notice_seconds == 24.0
    assert StepTimeout(5.0).notice_seconds == 5.0
    assert StepTimeout(None).notice_seconds == NOTICE_FLOOR_S


def _sleep_in_the_loop(seconds: float) -> None:
    time.sleep(seconds)


def test_the_report_says_where_the_main_thread_is():
    found = []
    looker = threading.Thread(target=lambda: (time.sleep(0.3), found.append(main_thread_position())))
    looker.start()
    _sleep_in_the_loop(0.8)
    looker.join()
    inside, where = found[0]
    assert not inside and "test_watchdog.py" in where and "_sleep_in_the_loop" in where


def test_the_description_names_the_rank_in_its_own_code_not_the_ones_waiting():
    def report(rank, inside, where="x.py:1 in f"):
        return HangReport(rank=rank, step=2, waited_s=11, timeout_s=10, in_collective=inside, where=where, at=0)

    text = describe_hang([report(0, True), report(1, False, "loop.py:7 in train_loop")], 2)
    assert "rank 1 (at loop.py:7 in train_loop) did not reach step 3 within the step timeout of 10 s" in text
    assert "rank 0" not in text
    assert "rank 1 (wrote no report)" in describe_hang([report(0, True)], 2)
    assert describe_hang([], 2) is None


def _rank(rank: int, folder: str, port: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    store = CheckpointStore(folder)
    dog = StepWatchdog(store, "l", 1, rank, timeout_s=1.5, interval_s=0.2,
                       on_hang=lambda report: os._exit(3)).start()
    dog.beat(1)
    if rank == 1:
        _sleep_in_the_loop(60)  # the hang: rank 1 never reaches its step
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for rank 1
    os._exit(0)


@pytest.mark.slow
def test_two_ranks_where_one_sleeps_forever_both_stop_and_the_report_names_the_sleeper(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    context = mp.get_context("spawn")
    procs = [context.Process(target=_rank, args=(r, str(tmp_path), port)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [3, 3] and time.monotonic() - started < 30
    text = describe_hang(read_reports(CheckpointStore(str(tmp_path)), "l", 1), 2)
    assert text.startswith("a rank hung: rank 1 (at ") and "_sleep_in_the_loop" in text, text


def test_the_report_looks_at_the_thread_that_runs_the_loop_not_the_main_thread(tmp_path):
    # Ray Train runs train_loop_per_worker on a thread of its own: that thread is the one to look at.
    reports = []

    def loop() -> None:
        dog = StepWatchdog(CheckpointStore(str(tmp_path)), "l", 1, 0, timeout_s=0.3, interval_s=0.05,
                           on_hang=reports.append).start()
        dog.beat(1)
        _sleep_in_the_loop(1.5)
        dog.close()

    runner = threading.Thread(target=loop)
    runner.start()
    runner.join()
    assert len(reports) == 1 and not reports[0].in_collective and "_sleep_in_the_loop" in reports[0].where
