"""Preemption: a notice becomes a checkpoint at the next step boundary, then a clean exit.

Whoever gets the notice (the `baton train` process on SIGTERM/SIGINT, a flow-run process that
Prefect cancels, a spot or Kubernetes handler calling `give_notice`) writes one small file into the
store, `<lineage>/_preempt/<fence>.json`: the store is the one thing every worker of every node
already reads. Rank 0 of the workers polls it on a thread; at each `ctx.step` all ranks agree
through one collective, rank 0 commits a fenced checkpoint of that exact step, and the block ends
with `Preempted`, whose message says where a rerun or Retry resumes. The fence in the name keeps a
notice to one run from stopping the next.

Three more sources of notice feed the same file: a cancellation of the flow run from the Prefect
UI or API (flows/signals.py watches the run's state; a served run also gets the runner's SIGTERM), and a
Ray node drain (`DrainWatch`: every rank reads whether its own node is draining).

`StopVote` is the workers' side, all of it here: it holds the watchers, runs the per-step vote over
Baton's collectives, decides whether the ranks stop at this step or after the epoch's end commit,
and raises `Preempted` saying where a rerun resumes. The commit itself is the TrainContext's.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from enum import Enum
from typing import Any, NoReturn

from ckpt import CheckpointStore, Lease, Position

from . import _ray_internals
from .collectives import Collectives
from .errors import Preempted, Where
from .waiting import Poller

log = logging.getLogger("baton.preempt")
DRAIN = "Ray node drain"  # how a drain's notice begins: the block is retried on the other nodes


def notice_path(store: CheckpointStore, lineage: str, fence: int) -> str:
    return store.path(lineage, "_preempt", f"{fence}.json")


def give_notice(store: CheckpointStore, lineage: str, fence: int, reason: str) -> None:
    """Ask the lineage's workers (of the run holding lease `fence`) to checkpoint and stop."""
    path = notice_path(store, lineage, fence)
    store.fs.makedirs(store.path(lineage, "_preempt"), exist_ok=True)
    store.fs.pipe(path, json.dumps({"reason": reason, "at": time.time()}).encode())


def withdraw_notice(store: CheckpointStore, lineage: str, fence: int) -> None:
    try:
        store.fs.rm(notice_path(store, lineage, fence))
    except FileNotFoundError:
        pass


class _Watcher:
    """Polls for a reason to stop every `interval_s` on a daemon thread (a `Poller`), so a
    training step only reads a flag. Subclasses say how in `_poll` (True once seen)."""

    def __init__(self, interval_s: float, name: str):
        self.interval_s = interval_s
        self.reason: str | None = None
        self._seen = threading.Event()
        # A storage or GCS hiccup must not kill training: logged at debug, the next poll retries.
        self._poller = Poller(self._poll, interval_s, name, logger=log, level=logging.DEBUG)

    @property
    def requested(self) -> bool:
        return self._seen.is_set()

    def _poll(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        self._poller.close()


class NoticeWatcher(_Watcher):
    """Rank 0: polls for a notice every `interval_s` on a daemon thread (a stat every 0.1 s on a
    local store, a HEAD every 0.25 s on S3), so the training step only reads a flag."""

    def __init__(self, store: CheckpointStore, lineage: str, fence: int, interval_s: float | None = None,
                 lease_every_s: float = 1.0):
        if interval_s is None:
            interval_s = 0.1 if store.is_local else 0.25
        super().__init__(interval_s, "baton-preempt-watch")
        self.path, self.fs = notice_path(store, lineage, fence), store.fs
        self.store, self.lineage, self.fence = store, lineage, fence
        self._lease_every_s, self._lease_checked = lease_every_s, float("-inf")
        if not self._poll():  # a notice given while the block started counts from the first step
            self._poller.start()

    def _poll(self) -> bool:
        try:
            self.fs.invalidate_cache(self.path.rsplit("/", 1)[0])  # s3fs would answer from a stale listing
            if self.fs.exists(self.path):
                return self._notice(json.loads(self.fs.cat_file(self.path)).get("reason", "notice"))
            if self.fence and time.monotonic() - self._lease_checked >= self._lease_every_s:
                self._lease_checked = time.monotonic()
                gone = self._holder_gone()
                if gone:
                    return self._notice(gone)
        except Exception as err:  # a storage hiccup must not kill training; the next poll retries
            log.debug("preemption watcher: %s", err)
        return False

    def _holder_gone(self) -> str | None:
        """The flow run holding the lease died (or lost it): the workers of a killed driver stop at
        the next step, with that step committed, instead of training on for nobody."""
        record = Lease.current(self.store, self.lineage)
        if record is None:
            return "the flow run released its lease"
        if record.fence != self.fence:
            return f"another run took the lease over (fence {record.fence})"
        if not record.holder_alive():
            return f"the flow run holding the lease is gone ({record.describe()})"
        return None

    def _notice(self, reason: str) -> bool:
        self.reason = reason
        self._seen.set()
        return True


class DrainWatch(_Watcher):
    """Every rank under Ray: is this rank's own node being drained (`ray drain-node`, an autoscaler's
    spot or preemption drain)? Polled once a second on a daemon thread, so the step reads a flag.

    Ray 2.60 tells a worker of a drain in two ways: `ray.train.get_preemption_info()`, a barrier of
    all ranks fed by Ray Train's PreemptionWatcher, which polls every 5 s; and the GCS's table of
    draining nodes (tasks/runtime/_ray_internals.py: node id -> deadline in ms), which
    that watcher and Ray Data read. Baton reads the table itself: no barrier, and a drain is known
    within a second. The first rank to see it writes the notice, so the block task knows why the
    workers stopped (and retries the block on the remaining nodes)."""

    def __init__(self, store: CheckpointStore, lineage: str, fence: int, rank: int, interval_s: float = 1.0):
        import ray

        super().__init__(interval_s, "baton-drain-watch")
        self.store, self.lineage, self.fence, self.rank = store, lineage, fence, rank
        self.node = ray.get_runtime_context().get_node_id()
        self.deadline: float | None = None  # time.time() of the drain's deadline, if it has one
        self.seen_at = 0.0
        self._poller.start()

    def _poll(self) -> bool:
        try:
            draining = _ray_internals.draining_nodes()
        except Exception as err:  # a GCS hiccup must not kill training; the next poll retries
            log.debug("drain watcher: %s", err)
            return False
        if self.node not in draining:
            return False
        deadline_ms = draining[self.node]
        self.seen_at = time.time()
        self.deadline = deadline_ms / 1000 if deadline_ms else None
        left = f"deadline in {self.deadline - time.time():.0f} s" if self.deadline else "no deadline"
        self.reason = f"{DRAIN}: node {self.node[:12]} of rank {self.rank} is draining ({left})"
        log.warning("%s: committing the step the workers are at, then stopping", self.reason)
        try:
            if not store_has_notice(self.store, self.lineage, self.fence):
                give_notice(self.store, self.lineage, self.fence, self.reason)
        except Exception as err:  # the vote still stops the workers; the block then says less
            log.warning("could not write the drain notice to the store: %s", err)
        self._seen.set()
        return True


def store_has_notice(store: CheckpointStore, lineage: str, fence: int) -> bool:
    path = notice_path(store, lineage, fence)
    store.fs.invalidate_cache(path.rsplit("/", 1)[0])
    return store.fs.exists(path)


def read_notice(store: CheckpointStore, lineage: str, fence: int) -> dict | None:
    """The notice given to the run holding lease `fence`, or None."""
    path = notice_path(store, lineage, fence)
    try:
        store.fs.invalidate_cache(path.rsplit("/", 1)[0])  # s3fs would answer from a stale listing
        return json.loads(store.fs.cat_file(path))
    except FileNotFoundError:
        return None


class Stop(str, Enum):
    """What the ranks do once they agreed that a notice came."""

    AT_STEP = "commit this step, then stop"
    AFTER_EPOCH = "stop after the epoch-end commit, which comes next"
    WITHOUT_CHECKPOINT = "stop now: this step cannot be checkpointed"


class StopVote:
    """How a notice stops every rank at the same step. Each step starts one collective vote ("did
    any rank see a notice?") and reads the answer of the one the previous step started, so a step
    never waits for it; all ranks read the same answer at the same step and stop there.

    Inputs are explicit: the collectives, this rank, the store and block to watch (`watch`); at each
    step, whether that step can be checkpointed (`at_step`); at a stop, the position and the newest
    committed checkpoint (`stop`)."""

    def __init__(self, dist: Collectives, rank: int):
        self._dist, self.rank = dist, rank
        self.notice: NoticeWatcher | None = None  # rank 0: the store's notice file, the lease's holder
        self.drain: DrainWatch | None = None  # every rank under Ray: is its own node draining?
        self._fence: int | None = None
        self._vote: Any = None  # the vote in flight (Collectives.start_any)
        self._after_epoch = False
        self._last_step_at: float | None = None
        self.step_s = 0.0  # the last step's duration, for the stop's log line

    def watch(self, store: CheckpointStore, lineage: str, fence: int, *, notices: bool, drain: bool) -> None:
        """Watch for notices to the run holding lease `fence` (again only when the fence changed)."""
        if fence == self._fence:
            return
        self.close()
        self._fence = fence
        self.notice = NoticeWatcher(store, lineage, fence) if notices else None
        self.drain = _drain_watch(store, lineage, fence, self.rank) if drain else None

    def at_step(self, *, committable: bool, epoch_end_follows: bool) -> Stop | None:
        """A collective, after each optimizer step: None to go on, else what every rank does now.
        `committable`: this step's position can be checkpointed; `epoch_end_follows`: it was the
        loader's last batch, so the epoch's end commit comes next."""
        now = time.perf_counter()
        if self._last_step_at is not None:
            self.step_s = now - self._last_step_at
        self._last_step_at = now
        agreed, self._vote = self._vote, self._dist.start_any(self.noticed)
        if agreed is None or not self._dist.finish_any(agreed):
            return None
        self.settle()
        if committable:
            return Stop.AT_STEP
        if epoch_end_follows:
            self._after_epoch = True
            return Stop.AFTER_EPOCH
        return Stop.WITHOUT_CHECKPOINT

    def at_epoch_end(self) -> bool:
        """A collective, before the epoch's end commit: stop after it? (A notice during the epoch's
        last step is answered here.)"""
        vote, self._vote = self._vote, None
        if vote is not None and self._dist.finish_any(vote):
            self._after_epoch = True
        return self._after_epoch

    def settle(self) -> None:
        """Finish the vote in flight (every rank has one, from the same step): before a block ends."""
        vote, self._vote = self._vote, None
        if vote is not None:
            self._dist.finish_any(vote)

    def stop(self, position: Position, last_committed: str | None, *, saved_s: float = 0.0,
             where: Where | None = None) -> NoReturn:
        """A collective: raise `Preempted` on every rank. `last_committed` is rank 0's newest committed
        checkpoint; `saved_s`, how long committing the step took; `where`, what that checkpoint holds."""
        checkpoint = self._dist.broadcast_object(last_committed)
        drain = self.drain if self.drain and self.drain.requested else None
        if where is None:
            where = "end of epoch" if position.epoch_complete else "step"
        stopped = Preempted(position.epoch, position.step, checkpoint, where=where,
                            reason=drain.reason if drain else "", drain=drain is not None)
        if where != "no checkpoint of the step":
            self._log(stopped, saved_s)
        raise stopped

    @property
    def noticed(self) -> bool:
        """This rank has seen a notice (rank 0: the store's; any rank: its node's drain)."""
        return bool(self.notice and self.notice.requested) or bool(self.drain and self.drain.requested)

    def _log(self, stopped: Preempted, saved_s: float) -> None:
        if self.rank == 0:
            reason = self.notice.reason if self.notice else "notice"
            log.warning("%s (%s). Stopping took %.2f s after the step (a step takes %.2f s, the save %.2f s): a "
                        "notice shorter than a step plus a save falls back to the last committed checkpoint",
                        stopped, reason, saved_s + self.step_s, self.step_s, saved_s)
        drain = self.drain
        if drain is not None and stopped.drain and drain.deadline is not None \
                and drain.deadline - drain.seen_at < self.step_s + saved_s:
            log.warning("the drain of this rank's node gave %.1f s of notice, less than a step plus a save "
                        "(%.2f s + %.2f s): had the node gone at its deadline, the run would have resumed at the "
                        "last committed checkpoint; a smaller checkpoint_every_steps loses less then",
                        drain.deadline - drain.seen_at, self.step_s, saved_s)

    def close(self) -> None:
        for watcher in (self.notice, self.drain):
            if watcher is not None:
                watcher.close()


def _drain_watch(store: CheckpointStore, lineage: str, fence: int, rank: int) -> DrainWatch | None:
    """A DrainWatch of this rank's node; None (logged) where Ray cannot say (no drain is then seen)."""
    try:
        return DrainWatch(store, lineage, fence, rank)
    except Exception as err:
        log.warning("rank %d cannot watch its Ray node for a drain (%s): a drain stops nothing early", rank, err)
        return None
