"""Preemption: a notice becomes a checkpoint at the next step boundary, then a clean exit.

Whoever gets the notice (the `baton train` process on SIGTERM/SIGINT, a flow-run process that
Prefect cancels, a spot or Kubernetes handler calling `give_notice`) writes one small file into the
store, `<lineage>/_preempt/<fence>.json`: the store is the one thing every worker of every node
already reads. Rank 0 of the workers polls it on a thread; at each `ctx.step` all ranks agree
through one collective, rank 0 commits a fenced checkpoint of that exact step, and the block ends
with `Preempted`, whose message says where a rerun or Retry resumes. The fence in the name keeps a
notice to one run from stopping the next.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time

from ckpt import CheckpointStore, Lease

log = logging.getLogger("baton.preempt")
MARKER = "preempted at epoch"  # in every Preempted message; block retries are skipped on it


class Preempted(Exception):
    """Training stopped on a preemption notice, after committing the step it stopped at."""


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


class NoticeWatcher:
    """Rank 0: polls for a notice every `interval_s` on a daemon thread (one small read on a local
    store, one HEAD on S3), so the training step only reads a flag."""

    def __init__(self, store: CheckpointStore, lineage: str, fence: int, interval_s: float = 0.25,
                 lease_every_s: float = 1.0):
        self.path, self.fs, self.interval_s = notice_path(store, lineage, fence), store.fs, interval_s
        self.store, self.lineage, self.fence = store, lineage, fence
        self._lease_every_s, self._lease_checked = lease_every_s, float("-inf")
        self.reason: str | None = None
        self._seen = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="baton-preempt-watch")
        if not self._poll():  # a notice given while the block started counts from the first step
            self._thread.start()

    @property
    def requested(self) -> bool:
        return self._seen.is_set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s) and not self._poll():
            pass

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

    def close(self) -> None:
        self._stop.set()


def clean_message(error: BaseException) -> str | None:
    """The Preempted line inside an error that crossed Ray (a worker's, wrapped by Ray Train)."""
    text = str(error)
    at = text.find(MARKER)
    if at < 0:
        return None
    return text[at:].splitlines()[0].strip()


@contextlib.contextmanager
def on_signals(store: CheckpointStore, lineage: str, fence: int):
    """While training: the first SIGTERM or SIGINT gives the workers notice (they checkpoint the
    step they are at and stop); a second one exits at once (the commit protocol keeps the store
    whole). Only in the main thread, where Python delivers signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum, frame) -> None:
        if received:
            log.warning("second signal: exiting now; the last committed checkpoint stands")
            os._exit(128 + signum)
        received.append(signum)
        name = signal.Signals(signum).name
        log.warning("%s: the workers checkpoint the step they are at and stop (a second signal exits at once)", name)
        try:
            give_notice(store, lineage, fence, name)
        except Exception as err:  # no notice possible: fall back to the last committed checkpoint
            log.error("could not give the workers notice (%s); exiting", err)
            os._exit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if received:
            withdraw_notice(store, lineage, fence)
