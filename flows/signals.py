"""The flow process's side of stopping.

While a flow trains, the first SIGTERM, SIGINT or SIGHUP, or a cancel from the Prefect UI, becomes a
notice to the workers (tasks/runtime/stop.py says how a notice stops them); a second signal ends
the process at once. The `baton` command installs the handler for its whole life (`install`, before
anything heavy is imported): a signal during start-up, before a flow run begins, ends the command at
once, and ending at once always takes every process the command started with it (`_process`).

Imports only the standard library at module level (see `install`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator, NoReturn

from . import _process

if TYPE_CHECKING:
    from ckpt import CheckpointStore

log = logging.getLogger("baton.preempt")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _Signals:
    """Process-wide: which signals came, and who acts on the first one."""

    def __init__(self) -> None:
        self.installed = False  # by `install`: the `baton` command's handler, for the process's life
        self.starting = True  # no flow run yet: a signal ends the command at once
        self.received: list[int] = []
        self.pending: int | None = None  # a first signal during a flow run, before training began
        self.hook: Callable[[int], None] | None = None  # `on_signals`: the signal becomes a notice
        self.trained = False  # `on_signals` ended: what is left is publishing, printing, shutting down
        self.terminal: _process.Terminal | None = None
        self.where: Callable[[], str] | None = None  # where the lineage stands, for the last line


_STATE = _Signals()
_EXITING = threading.Lock()


def install() -> None:
    """The `baton` command's handler of SIGTERM, SIGINT and SIGHUP, from its first line on. No-op
    outside the main thread, and the second time."""
    if _STATE.installed or threading.current_thread() is not threading.main_thread():
        return
    _STATE.installed = True
    _STATE.terminal = _process.Terminal()
    _process.adopt_orphans()
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handle)
    _count_deliveries()


def _count_deliveries() -> None:
    """Python runs a handler only between bytecodes of the main thread, and two deliveries before
    that are one call: a second Ctrl-C while the main thread waits inside C code would be lost. The
    interpreter also writes every delivery's number to a wake-up fd; a thread counts them there and
    ends the process on the second one (and on a first one during start-up) whatever the main
    thread is doing."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    threading.Thread(target=_watch_deliveries, args=(read_end,), daemon=True, name="baton-signals").start()


def _watch_deliveries(read_end: int) -> None:
    count = 0
    while True:
        try:
            delivered = os.read(read_end, 64)
        except InterruptedError:
            continue
        except OSError:
            return
        for signum in delivered:
            if signum not in STOP_SIGNALS:
                continue
            count += 1
            if signum == signal.SIGHUP and _STATE.terminal is not None:
                _STATE.terminal.hung_up()
            name = signal.Signals(signum).name
            if count >= 2:
                exit_now(signum, f"second signal: exiting now ({name}); the last committed checkpoint stands")
            if _STATE.starting:
                exit_now(signum, f"{name}: stopped during start-up, before training began")


def reclaim() -> None:
    """Baton's handler again, after a library put its own in place (`ray.init` makes SIGTERM a
    `sys.exit` in the driver). No-op without `install`."""
    if _STATE.installed and threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _handle)


@contextlib.contextmanager
def through_ray_init() -> Iterator[None]:
    """Around `ray.init` during start-up: Ray 2.60's `ray.init` makes SIGTERM a `sys.exit(15)` from
    its first line, for the whole local start (12-16 s here), so a SIGTERM then ended `baton` with
    status 15, no line, after Ray's own ~15 s shutdown. Such an exit is handled as Baton handles a
    SIGTERM during start-up (one line, every process started killed, status 143); Baton's handler
    is back afterwards. Without `install` (a served flow run, a test) Ray's exit stands."""
    try:
        yield
    except SystemExit as stop:
        if _STATE.installed and stop.code == signal.SIGTERM and threading.current_thread() is threading.main_thread():
            _handle(signal.SIGTERM, None)  # during start-up it exits; else it was noted, and the exit stands
        raise
    finally:
        reclaim()


def uninstall() -> None:
    """Python's own handling again (`baton serve`: Prefect's runner stops its flow runs itself)."""
    if not _STATE.installed:
        return
    _STATE.installed = False
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)


def flow_started() -> None:
    """From now on a first signal asks the flow run to stop (a flow run that ended at once would
    stay Running on the server); before, it ends the command at once."""
    _STATE.starting = False


def tell_where(describe: Callable[[], str]) -> None:
    """How the last line says where the lineage stands (`describe` reads the store)."""
    _STATE.where = describe


def signal_received() -> int | None:
    """The first stop signal this process got, if any."""
    return _STATE.received[0] if _STATE.received else None


def _where(timeout_s: float = 2.0) -> str:
    # In a thread with a time limit: an unreachable store must not hold up an exit that is due now.
    if _STATE.where is None:
        return ""
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.append(_STATE.where()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return f"; {said[0]}" if said else ""


def exit_now(signum: int, what: str) -> NoReturn:
    """End the process at once, with every process it started; the commit protocol keeps the store
    whole. One line to the log and, for `baton`, to the terminal. Called from two threads at once
    (a signal's handler and the delivery counter), one of them does it."""
    if not _EXITING.acquire(blocking=False):
        while True:  # the other caller is ending the process
            time.sleep(60)
    line = f"{what}{_where()}"
    terminal = _STATE.terminal
    if terminal is None:
        log.warning("%s", line)
    else:
        terminal.say(f"baton: {line}")
        if not terminal.is_stderr():  # fd 2 leads to the run's log file: the line there too
            # Written directly, not logged: the main thread may hold the logging lock forever now.
            with contextlib.suppress(OSError):
                os.write(2, f"{time.strftime('%H:%M:%S')} | WARNING | baton.preempt - {line}\n".encode())
    _process.kill_descendants()
    os._exit(128 + signum)


def _handle(signum: int, frame) -> None:
    name = signal.Signals(signum).name
    if signum == signal.SIGHUP and _STATE.terminal is not None:
        _STATE.terminal.hung_up()
    if _STATE.received:
        exit_now(signum, f"second signal: exiting now ({name}); the last committed checkpoint stands")
    _STATE.received.append(signum)
    if _STATE.hook is not None:
        _STATE.hook(signum)
    elif _STATE.starting:
        exit_now(signum, f"{name}: stopped during start-up, before training began")
    else:
        _STATE.pending = signum
        log.warning("%s: %s (a second signal exits at once)", name,
                    "training is over, the run ends in a moment" if _STATE.trained else
                    "the run stops before its first block")


@contextlib.contextmanager
def _hooked(hook: Callable[[int], None]) -> Iterator[int | None]:
    """`hook` gets the first stop signal while the block runs; yields a signal that came before.
    Without `install` (a served flow run, a test), the handler is installed for the block only."""
    main = threading.current_thread() is threading.main_thread()
    previous = {}
    if main and not _STATE.installed:
        _STATE.received.clear()
    if main:
        # Also with `install`: Prefect's flow engine put its own SIGTERM handler in its place.
        previous = {sig: signal.signal(sig, _handle) for sig in STOP_SIGNALS}
    pending, _STATE.pending, _STATE.hook = _STATE.pending, None, hook
    try:
        yield pending
    finally:
        _STATE.hook, _STATE.trained = None, True
        for sig, old in previous.items():
            signal.signal(sig, _handle if _STATE.installed else old)


def _prefect_cancels() -> bool:
    """A served flow run (Prefect's Runner: `baton serve`, a worker) is cancelled by SIGTERM, sent
    right after the runner's "cancel" intent is acknowledged on its control channel; the intent
    tells that SIGTERM from any other."""
    from ._prefect_internals import control_intent

    return control_intent() == "cancel"


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
def on_signals(store: "CheckpointStore", lineage: str, fence: int, flow_run_id: str | None = None):
    """While training: the first SIGTERM, SIGINT or SIGHUP gives the workers notice (they
    checkpoint the step they are at and stop); a second one exits at once (the commit protocol
    keeps the store whole). A signal that came after the flow run began and before this block
    gives notice at once. Signals only in the main thread, where Python delivers them. With
    `flow_run_id`, a cancel of that flow run from the Prefect UI or API gives notice too. Yields
    the StopRequest."""
    from tasks.runtime.stop import give_notice, withdraw_notice

    request = StopRequest()

    def notify(reason: str, cancelled: bool, signum: int | None = None) -> None:
        if not request.note(reason, cancelled):
            return
        log.warning("%s: the workers checkpoint the step they are at and stop%s", reason,
                    " (a second signal exits at once)" if signum is not None else "")
        try:
            give_notice(store, lineage, fence, reason)
        except Exception as err:  # no notice possible: fall back to the last committed checkpoint
            exit_now(signum or signal.SIGTERM, f"could not give the workers notice ({err}); exiting")

    def on_signal(signum: int) -> None:
        cancelled = _prefect_cancels()
        name = signal.Signals(signum).name
        notify(f"{name} (the flow run was cancelled)" if cancelled else name, cancelled, signum)

    watch = _CancelWatch(flow_run_id, lambda: notify("cancelled from the Prefect UI or API", True)) \
        if flow_run_id else contextlib.nullcontext()
    try:
        with _hooked(on_signal) as pending, watch:
            if pending is not None:
                on_signal(pending)
            yield request
    finally:
        if request.reason is not None:
            withdraw_notice(store, lineage, fence)




@contextlib.contextmanager
def children_ignore_hangup() -> Iterator[None]:
    """Processes started from this thread meanwhile never see SIGHUP (a blocked signal stays
    blocked across fork and exec); this process still gets it, in another thread."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


__all__ = ["StopRequest", "children_ignore_hangup", "exit_now", "flow_started", "install", "on_signals",
           "reclaim", "signal_received", "tell_where", "through_ray_init", "uninstall"]
