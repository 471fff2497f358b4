"""Preemption: a notice becomes a checkpoint at the next step boundary, then a clean exit.

Whoever gets the notice (the `baton train` process on SIGTERM/SIGINT, a flow-run process that
Prefect cancels, a spot or Kubernetes handler calling `give_notice`) writes one small file into the
store, `<lineage>/_preempt/<fence>.json`: the store is the one thing every worker of every node
already reads. Rank 0 of the workers polls it on a thread; at each `ctx.step` all ranks agree
through one collective, rank 0 commits a fenced checkpoint of that exact step, and the block ends
with `Preempted`, whose message says where a rerun or Retry resumes. The fence in the name keeps a
notice to one run from stopping the next.

Three more sources of notice feed the same file: a cancellation of the flow run from the Prefect
UI or API (`on_signals` watches the run's state; a served run also gets the runner's SIGTERM), and a
Ray node drain (`DrainWatch`: every rank reads whether its own node is draining).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import signal
import sys
import threading
import time

from ckpt import CheckpointStore, Lease

log = logging.getLogger("baton.preempt")
MARKER = "preempted at epoch"  # in every Preempted message; block retries are skipped on it
DRAIN = "Ray node drain"  # in the notice (and Preempted message) of a drain: the block is retried elsewhere


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


def clean_message(error: BaseException) -> str | None:
    """The Preempted line inside an error that crossed Ray (a worker's, wrapped by Ray Train)."""
    text = str(error)
    at = text.find(MARKER)
    if at < 0:
        return None
    return text[at:].splitlines()[0].strip()


class DrainWatch(_Watcher):
    """Every rank under Ray: is this rank's own node being drained (`ray drain-node`, an autoscaler's
    spot or preemption drain)? Polled once a second on a daemon thread, so the step reads a flag.

    Ray 2.60 tells a worker of a drain in two ways: `ray.train.get_preemption_info()`, a barrier of
    all ranks fed by Ray Train's PreemptionWatcher, which polls every 5 s; and the GCS's table of
    draining nodes (`ray._private.state.state.get_draining_nodes()`, node id -> deadline in ms), which
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
            import ray._private.state

            draining = ray._private.state.state.get_draining_nodes() or {}
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


def _prefect_cancels() -> bool:
    """A served flow run (Prefect's Runner: `baton serve`, a worker) is cancelled by SIGTERM, sent
    right after the runner's "cancel" intent is acknowledged on its control channel (Prefect 3.9:
    prefect.runner._cancellation_manager); the intent tells that SIGTERM from any other."""
    # Only where Prefect already runs: its control listener is imported when a flow run starts, and
    # importing Prefect inside a signal handler would delay the notice by a second.
    listener = sys.modules.get("prefect._internal.control_listener")
    try:
        return listener is not None and listener.get_intent() == "cancel"
    except Exception:  # another Prefect version: the state watch below still sees the cancel
        return False


class StopRequest:
    """Why this flow run was asked to stop, if it was: what the flow reports at the end."""

    def __init__(self):
        self.reason: str | None = None
        self.cancelled = False  # from the Prefect UI or API: the run ends Cancelled, not Failed
        self.at: float | None = None  # time.perf_counter() of the first notice

    def note(self, reason: str, cancelled: bool = False) -> bool:
        """True the first time: the caller gives the notice."""
        self.cancelled = self.cancelled or cancelled
        if self.reason is not None:
            return False
        self.reason, self.at = reason, time.perf_counter()
        return True


class _CancelWatch:
    """Flow process: reads the flow run's state every `interval_s`; Cancelling (the UI's Cancel
    button sets it through `POST /flow_runs/{id}/set_state`) becomes a notice. Prefect 3.9 itself
    only acts on a cancel through a runner (which kills the process); a flow run started in a
    terminal (`baton train`) has none, so nothing else would stop it."""

    def __init__(self, flow_run_id: str, on_cancel, interval_s: float = 1.0):
        self.flow_run_id, self.on_cancel, self.interval_s = flow_run_id, on_cancel, interval_s
        self._stop = threading.Event()
        # In this thread's context: a new thread starts with none, and Prefect's settings (the API URL
        # `baton train` points at its temporary server) live in a context variable; without them
        # get_client starts yet another temporary server.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._loop,), daemon=True,
                                        name="baton-cancel-watch")

    def _loop(self) -> None:
        from prefect.client.orchestration import get_client

        try:
            with get_client(sync_client=True) as client:
                while not self._stop.wait(self.interval_s):
                    try:
                        state = client.read_flow_run(self.flow_run_id).state
                    except Exception as err:  # the server may be busy: the next read retries
                        log.debug("cancel watch: %s", err)
                        continue
                    if state is not None and (state.is_cancelling() or state.is_cancelled()):
                        self.on_cancel()
                        return
        except Exception as err:  # no client: cancellation then only works through a runner's SIGTERM
            log.warning("cannot watch flow run %s for a cancel from the UI: %s", self.flow_run_id, err)

    def __enter__(self) -> "_CancelWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()


@contextlib.contextmanager
def on_signals(store: CheckpointStore, lineage: str, fence: int, flow_run_id: str | None = None):
    """While training: the first SIGTERM or SIGINT gives the workers notice (they checkpoint the
    step they are at and stop); a second one exits at once (the commit protocol keeps the store
    whole). Signals only in the main thread, where Python delivers them. With `flow_run_id`, a
    cancel of that flow run from the Prefect UI or API gives notice too. Yields the StopRequest."""
    request = StopRequest()

    def notify(reason: str, cancelled: bool, signum: int | None = None) -> None:
        if not request.note(reason, cancelled):
            return
        log.warning("%s: the workers checkpoint the step they are at and stop%s", reason,
                    " (a second signal exits at once)" if signum is not None else "")
        try:
            give_notice(store, lineage, fence, reason)
        except Exception as err:  # no notice possible: fall back to the last committed checkpoint
            log.error("could not give the workers notice (%s); exiting", err)
            os._exit(128 + (signum or signal.SIGTERM))

    def handler(signum, frame) -> None:
        if received:
            log.warning("second signal: exiting now; the last committed checkpoint stands")
            os._exit(128 + signum)
        received.append(signum)
        cancelled = _prefect_cancels()
        name = signal.Signals(signum).name
        notify(f"{name} (the flow run was cancelled)" if cancelled else name, cancelled, signum)

    received: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    watch = _CancelWatch(flow_run_id, lambda: notify("cancelled from the Prefect UI or API", True)) \
        if flow_run_id else contextlib.nullcontext()
    try:
        with watch:
            yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if request.reason is not None:
            withdraw_notice(store, lineage, fence)
