"""The single-writer lease of a lineage (DESIGN invariant 4): holding, refusing, taking over a dead
or stale holder, fencing a writer that lost its lease, and racing writers, on real stores."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from ckpt import CheckpointStore, Lease, LeaseHeld, LeaseLost, LeaseRecord, Position, TrainingState, encode
from ckpt.manifest import utcnow

from .conftest import SHARED_BACKENDS

ROOT = Path(__file__).resolve().parents[2]


def commit_files(epoch: int = 0, step: int = 1):
    torch.manual_seed(epoch)
    pos = Position(epoch=epoch, batch_in_epoch=0, epoch_complete=True, step=step)
    files = encode(TrainingState(model=torch.nn.Linear(3, 2).state_dict(), position=pos))
    digest = files.digest
    return pos, files, digest


class FakeClock:
    """Wall time that moves only when the test moves it, and the heartbeat's wait on it: a test of
    expiry or of heartbeats runs in no time, and each `tick` is seen whole by a waiting heartbeat."""

    def __init__(self):
        self.now = time.time()  # near real time: records stay plausible to other readers
        self._moved = threading.Condition()
        self._waits = self._ticked = 0

    def __call__(self) -> float:
        return self.now

    def datetime(self) -> datetime:
        return datetime.fromtimestamp(self.now, timezone.utc)

    def advance(self, seconds: float) -> None:
        with self._moved:
            self.now += seconds
            self._moved.notify_all()

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        with self._moved:
            self._waits += 1
            self._moved.notify_all()
            until = self.now + seconds
            while not stop.is_set() and self.now < until:
                self._moved.wait(0.01)  # the lease's release sets `stop` without notifying us
        return stop.is_set()

    def settled(self) -> None:
        """Until the heartbeat waits again (it has done what the last tick woke it for)."""
        with self._moved:
            assert self._moved.wait_for(lambda: self._waits > self._ticked, timeout=10), "the heartbeat is stuck"

    def tick(self, seconds: float) -> None:
        """Move time on once the heartbeat waits, so it wakes for exactly this step."""
        self.settled()
        with self._moved:
            self._ticked = self._waits
        self.advance(seconds)


def dead_pid() -> int:
    """The pid of a process of ours that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- holding and releasing -------------------------------------------------------------------
def test_a_lease_is_recorded_in_the_store_with_fence_one_and_released(store):
    lease = Lease(store, "run", owner="trainer-a", ttl_s=60)
    assert Lease.current(store, "run") is None
    assert lease.acquire() == 1 == lease.fence
    record = Lease.current(store, "run")
    assert (record.owner, record.pid, record.fence, record.ttl_s) == ("trainer-a", os.getpid(), 1, 60)
    assert record.holder_alive()
    Lease.check(store, "run", 1)
    lease.release()
    assert Lease.current(store, "run") is None and lease.fence is None
    with pytest.raises(LeaseLost, match="released"):
        Lease.check(store, "run", 1)


def test_a_released_lease_is_taken_at_once_with_the_next_fence(store):
    first = Lease(store, "run", owner="a", ttl_s=60)
    first.acquire()
    first.release()
    second = Lease(store, "run", owner="b", ttl_s=60)
    assert second.acquire() == 2
    assert Lease.current(store, "run").owner == "b"


def test_a_second_writer_is_refused_while_the_holder_lives_and_is_told_who_holds_it(store):
    holder = Lease(store, "run", owner="nightly-retrain@host-7", ttl_s=60)
    holder.acquire()
    with pytest.raises(LeaseHeld, match="nightly-retrain@host-7") as refused:
        Lease(store, "run", owner="someone-else", ttl_s=60).acquire()
    assert "fence 1" in str(refused.value)
    assert Lease.current(store, "run").owner == "nightly-retrain@host-7"
    Lease.check(store, "run", holder.fence)  # the holder is untouched


def test_leases_of_different_lineages_are_independent(store):
    assert Lease(store, "one", ttl_s=60).acquire() == 1
    assert Lease(store, "two", ttl_s=60).acquire() == 1


# ---- taking over -----------------------------------------------------------------------------
def test_a_lease_whose_ttl_ran_out_is_taken_over_with_a_higher_fence(store):
    clock = FakeClock()
    stale = Lease(store, "run", owner="stale", ttl_s=1.0, clock=clock)
    stale.acquire()  # no heartbeat: acquired outside the context manager
    clock.advance(0.9)
    with pytest.raises(LeaseHeld):
        Lease(store, "run", owner="eager", ttl_s=60, clock=clock).acquire()
    clock.advance(0.15)
    taker = Lease(store, "run", owner="taker", ttl_s=60, clock=clock)
    assert taker.acquire() == 2
    assert Lease.current(store, "run").owner == "taker"
    with pytest.raises(LeaseLost, match="taker"):
        Lease.check(store, "run", stale.fence)
    Lease.check(store, "run", taker.fence)


@pytest.mark.parametrize("store_url", SHARED_BACKENDS, indirect=True)
def test_a_lease_whose_holder_process_died_on_this_host_is_taken_over_at_once(store_url):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from ckpt import CheckpointStore, Lease; "
         "print(Lease(CheckpointStore(sys.argv[1]), 'run', owner='doomed', ttl_s=600).acquire(), flush=True); "
         "time.sleep(600)", store_url],
        cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "1"
        store = CheckpointStore(store_url)
        with pytest.raises(LeaseHeld, match="doomed"):
            Lease(store, "run", ttl_s=60).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert Lease.current(store, "run").pid == holder.pid  # its record says 600 s more
    began = time.monotonic()
    assert Lease(store, "run", owner="successor", ttl_s=60).acquire() == 2
    assert time.monotonic() - began < 10


def test_a_claim_left_by_a_writer_that_died_before_recording_it_does_not_block_the_lineage(store):
    # What a writer killed between its claim and its record leaves behind.
    orphan = LeaseRecord(owner="died-mid-acquire", host=socket.gethostname(), pid=dead_pid(), fence=1,
                         heartbeat_at=utcnow(), ttl_s=600)
    store.fs.pipe_file(store.path("run", "_lease", "claim-000000000001"), orphan.model_dump_json().encode())
    assert Lease(store, "run", owner="next", ttl_s=60).acquire() == 2


def test_a_dead_claimant_above_a_live_holder_does_not_let_a_third_writer_in(store):
    holder = Lease(store, "run", owner="holder", ttl_s=60)
    holder.acquire()
    orphan = LeaseRecord(owner="died-mid-acquire", host=socket.gethostname(), pid=dead_pid(), fence=2,
                         heartbeat_at=utcnow(), ttl_s=600)
    store.fs.pipe_file(store.path("run", "_lease", "claim-000000000002"), orphan.model_dump_json().encode())
    with pytest.raises(LeaseHeld, match="holder"):
        Lease(store, "run", owner="third", ttl_s=60).acquire()
    Lease.check(store, "run", holder.fence)


def test_a_claim_being_taken_by_a_live_writer_is_respected(store):
    # What a live contender has written between its claim and its record.
    claiming = LeaseRecord(owner="mid-acquire", host=socket.gethostname(), pid=os.getpid(), fence=1,
                           heartbeat_at=utcnow(), ttl_s=600)
    store.fs.pipe_file(store.path("run", "_lease", "claim-000000000001"), claiming.model_dump_json().encode())
    with pytest.raises(LeaseHeld, match="fence 1"):
        Lease(store, "run", owner="late", ttl_s=60).acquire()


# ---- fencing ---------------------------------------------------------------------------------
def test_a_writer_whose_lease_was_taken_over_can_no_longer_commit(store):
    clock = FakeClock()
    old = Lease(store, "run", owner="old", ttl_s=0.3, clock=clock)
    old_fence = old.acquire()
    clock.advance(0.4)
    new = Lease(store, "run", owner="new", ttl_s=60, clock=clock)
    new_fence = new.acquire()
    assert new_fence > old_fence

    pos, files, digest = commit_files(0, 1)
    with pytest.raises(LeaseLost, match="new"):
        store.commit("run", pos, files, digest=digest, fence=old_fence,
                     before_commit=lambda: Lease.check(store, "run", old_fence))
    assert store.list("run") == []
    with pytest.raises(LeaseLost):
        old.heartbeat()
    old.release()  # a writer that lost its lease does not remove the new holder's
    assert Lease.current(store, "run").owner == "new"

    manifest = store.commit("run", pos, files, digest=digest, fence=new_fence,
                            before_commit=lambda: Lease.check(store, "run", new_fence))
    assert [m.id for m in store.list("run")] == [manifest.id] and manifest.fence == new_fence


# ---- heartbeat -------------------------------------------------------------------------------
def test_the_heartbeat_keeps_a_lease_alive_well_beyond_its_ttl(store):
    clock = FakeClock()
    with Lease(store, "run", owner="long-run", ttl_s=1.0, clock=clock, wait=clock.wait) as lease:
        first = Lease.current(store, "run").heartbeat_at
        for _ in range(12):  # four ttls, at one beat per third of a ttl
            clock.tick(1.0 / 3)
        clock.settled()
        with pytest.raises(LeaseHeld, match="long-run"):
            Lease(store, "run", owner="vulture", ttl_s=60, clock=clock).acquire()
        record = Lease.current(store, "run")
        assert record.heartbeat_at == clock.datetime() > first and record.fence == lease.fence
        assert lease.lost is None
    assert Lease.current(store, "run") is None  # leaving the block releases it


def test_without_a_heartbeat_the_same_lease_goes_stale(store):
    clock = FakeClock()
    lease = Lease(store, "run", owner="silent", ttl_s=0.6, clock=clock)
    lease.acquire()
    assert Lease.current(store, "run").holder_alive(clock.datetime())
    clock.advance(1.0)
    assert not Lease.current(store, "run").holder_alive(clock.datetime())
    assert Lease(store, "run", owner="vulture", ttl_s=60, clock=clock).acquire() == 2


def test_a_heartbeat_that_finds_its_lease_taken_over_stops_and_keeps_why(store):
    clock, later = FakeClock(), FakeClock()
    with Lease(store, "run", owner="paused", ttl_s=1.0, clock=clock, wait=clock.wait) as lease:
        later.advance(2.0)  # a contender whose clock says the holder missed its heartbeats
        assert Lease(store, "run", owner="successor", ttl_s=60, clock=later).acquire() == 2
        clock.tick(1.0 / 3)
        lease._thread.join(10)
        assert not lease._thread.is_alive() and isinstance(lease.lost, LeaseLost)
        assert "successor" in str(lease.lost)
    assert Lease.current(store, "run").owner == "successor"  # the lost holder removes nothing


# ---- racing ----------------------------------------------------------------------------------
ROUNDS, CONTENDERS = 10, 4


def contend(url: str, rounds: int, start, done, results) -> None:
    """One racing writer: each round, try for the lineage the moment the others do."""
    store = CheckpointStore(url)
    for r in range(rounds):
        lease = Lease(store, f"race-{r}", owner=f"contender-{os.getpid()}-{threading.get_ident()}", ttl_s=60)
        start.wait()
        try:
            results.put((r, lease.owner, lease.acquire()))
        except LeaseHeld:
            results.put((r, lease.owner, None))
        done.wait()  # winners stay alive (and hold) until every contender has tried


def check_one_winner_per_round(store: CheckpointStore, outcomes: list[tuple[int, str, int | None]]) -> None:
    for r in range(ROUNDS):
        tries = [(owner, fence) for rr, owner, fence in outcomes if rr == r]
        assert len(tries) == CONTENDERS
        winners = [(owner, fence) for owner, fence in tries if fence is not None]
        assert len(winners) == 1, f"round {r}: {len(winners)} writers acquired the lease: {winners}"
        record = Lease.current(store, f"race-{r}")
        assert (record.owner, record.fence) == winners[0]


@pytest.mark.slow
@pytest.mark.parametrize("store_url", SHARED_BACKENDS, indirect=True)
def test_processes_racing_for_a_free_lineage_never_both_win(store_url):
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, like separate flow runs
    start, done, results = ctx.Barrier(CONTENDERS), ctx.Barrier(CONTENDERS), ctx.Queue()
    procs = [ctx.Process(target=contend, args=(store_url, ROUNDS, start, done, results)) for _ in range(CONTENDERS)]
    for proc in procs:
        proc.start()
    try:
        outcomes = [results.get(timeout=120) for _ in range(ROUNDS * CONTENDERS)]
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    assert all(proc.exitcode == 0 for proc in procs)
    check_one_winner_per_round(CheckpointStore(store_url), outcomes)


def test_threads_racing_for_a_free_lineage_never_both_win(store_url):
    import queue

    start, done, results = threading.Barrier(CONTENDERS), threading.Barrier(CONTENDERS), queue.Queue()
    threads = [threading.Thread(target=contend, args=(store_url, ROUNDS, start, done, results))
               for _ in range(CONTENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    outcomes = [results.get_nowait() for _ in range(results.qsize())]
    check_one_winner_per_round(CheckpointStore(store_url), outcomes)
