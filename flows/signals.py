"""The flow process's side of stopping: signals and a cancel from the Prefect UI become a notice
to the workers (tasks/runtime/stop.py says how a notice stops them)."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import signal
import sys
import threading
import time

from ckpt import CheckpointStore
from tasks.runtime.stop import give_notice, withdraw_notice

log = logging.getLogger("baton.preempt")


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
