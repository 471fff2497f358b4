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
"""

from __future__ import annotations

import json
import logging
import threading
import time

from ckpt import CheckpointStore, Lease

from . import _ray_internals

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
    """Polls for a reason to stop every `interval_s` on a daemon thread, so a training step only
    reads a flag. Subclasses say how in `_poll` (True once seen)."""

    def __init__(self, interval_s: float, name: str):
        self.interval_s = interval_s
        self.reason: str | None = None
        self._seen = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=name)

    @property
    def requested(self) -> bool:
        return self._seen.is_set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s) and not self._poll():
            pass

    def _poll(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()


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
            self._thread.start()

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
        self._thread.start()

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


