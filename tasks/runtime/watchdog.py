"""A rank that hangs is caught: every rank of a Ray Train block watches its own progress.

A rank that stops making progress (a deadlock in the loop, a data source that never answers, a
`time.sleep` left in) stalls every other rank in the next collective, and nothing fails: Ray Train
sees live processes. So each rank runs a `StepWatchdog` thread. `beat()` is called at every
`ctx.step` / `ctx.end_epoch`; Baton's own slow phases (a checkpoint commit, waiting between warm
blocks) run `paused()`. When no beat came for the step timeout, the rank writes where its main
thread is into the store (`<lineage>/_hang/<fence>/rank-R.json`), waits a moment for the other
ranks' reports, and exits its process: Ray Train then sees a failed worker, the block fails, and the
block task names the rank that hung (`describe_hang`) from the reports: the rank whose main
thread is in the loop's own code, while the others wait inside torch's collectives. Nothing of the
hung step is committed (commits happen at steps), and the block is retried as any failure.

The timeout is `step_timeout_s` when set; otherwise it is measured: `AUTO_FACTOR` times the
slowest step seen in this block, at least `AUTO_FLOOR_S`, and `STARTUP_ALLOWANCE_S` until the first
steps are seen (the first step pays for data loading and DDP's first buckets). A preemption notice
seen during a hang shortens it to the notice's grace (`StepTimeout.notice_seconds`: three slowest
steps, at least `NOTICE_FLOOR_S`; a commit is paused time, so a normal stop at a step is never cut
short): the workers stop within a runner's 30 s grace, and the run falls back to the last committed
checkpoint instead of never stopping.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from typing import Callable, Iterator

from pydantic import BaseModel

from ckpt import CheckpointStore

log = logging.getLogger("baton.worker")

AUTO_FACTOR = 20.0
AUTO_FLOOR_S = 60.0
STARTUP_ALLOWANCE_S = 300.0
STEPS_BEFORE_AUTO = 3
NOTICE_FLOOR_S = 10.0
REPORT_GRACE_S = 3.0  # how long a rank that timed out waits for the others' reports before exiting


class HangReport(BaseModel):
    """Where one rank was when its step timeout ran out."""

    rank: int
    step: int  # the global step of its last beat
    waited_s: float
    timeout_s: float
    in_collective: bool  # the loop's thread is inside torch (a collective, DDP's backward): it waits for others
    where: str  # the innermost frame of the loop's thread outside torch, "file:line in function"
    at: float  # time.time()


def report_folder(store: CheckpointStore, lineage: str, fence: int) -> str:
    return store.path(lineage, "_hang", str(fence))


def _torch_frame(filename: str) -> bool:
    return f"{os.sep}torch{os.sep}" in filename or f"{os.sep}ray{os.sep}" in filename


def main_thread_position(ident: int | None = None) -> tuple[bool, str]:
    """(inside torch or Ray?, the innermost frame of the loop's own code) of thread `ident`: the
    thread that runs the loop (Ray Train runs it on a thread of its own, not the main thread)."""
    frame = sys._current_frames().get(ident if ident is not None else threading.main_thread().ident)
    innermost = frame
    while frame is not None and _torch_frame(frame.f_code.co_filename):
        frame = frame.f_back
    inside = innermost is not None and _torch_frame(innermost.f_code.co_filename)
    if frame is None:
        return inside, "unknown"
    return inside, f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


class StepTimeout:
    """The step timeout: fixed when `step_timeout_s` is set, else measured from the steps seen."""

    def __init__(self, fixed_s: float | None):
        self.fixed_s, self.slowest_s, self.steps = fixed_s, 0.0, 0

    def observe(self, step_s: float) -> None:
        self.steps += 1
        self.slowest_s = max(self.slowest_s, step_s)

    @property
    def seconds(self) -> float:
        if self.fixed_s is not None:
            return self.fixed_s
        if self.steps < STEPS_BEFORE_AUTO:
            return STARTUP_ALLOWANCE_S
        return max(AUTO_FLOOR_S, AUTO_FACTOR * self.slowest_s)

    @property
    def notice_seconds(self) -> float:
        """How long a rank may go without a step once a preemption notice is out."""
        return min(self.seconds, max(NOTICE_FLOOR_S, 3 * self.slowest_s))


class StepWatchdog:
    """One rank's watch on its own progress (see the module's docstring). `on_hang` runs on the
    watchdog's thread once the timeout ran out and the report is written (default: exit the process)."""

    def __init__(self, store: CheckpointStore, lineage: str, fence: int, rank: int, *, timeout_s: float | None,
                 noticed: Callable[[], bool] = lambda: False,
                 on_hang: Callable[[HangReport], None] | None = None, interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.store, self.lineage, self.fence, self.rank = store, lineage, fence, rank
        self.timeout, self.noticed = StepTimeout(timeout_s), noticed
        self.on_hang = on_hang or _exit_process
        self.interval_s, self.clock = interval_s, clock
        self.step = 0
        self._last = clock()
        self._paused = 0
        self._relaxed = True  # until the first beat: start-up (restore, loaders, DDP's first buckets)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.fired: HangReport | None = None
        self.loop_thread = threading.get_ident()  # built by ctx.epochs(), on the loop's own thread
        self._thread = threading.Thread(target=self._loop, daemon=True, name="baton-step-watchdog")

    def start(self) -> "StepWatchdog":
        self._thread.start()
        return self

    def beat(self, step: int, *, epoch_end_next: bool = False) -> None:
        """Step `step` is done. `epoch_end_next`: it was the loader's last batch, and what comes
        before `end_epoch` (a validation pass) is the loop's own: the start-up allowance holds then."""
        now = self.clock()
        with self._lock:
            if self.step and step > self.step and not self._relaxed:
                self.timeout.observe(now - self._last)
            self.step, self._last, self._relaxed = step, now, epoch_end_next

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Baton's own long phases (a commit, the wait for the next warm block) are not steps."""
        with self._lock:
            self._paused += 1
        try:
            yield
        finally:
            with self._lock:
                self._paused -= 1
                self._last = self.clock()

    def overdue(self) -> float | None:
        """Seconds without a beat past the timeout in force, if the rank is overdue; else None."""
        with self._lock:
            if self._paused:
                return None
            waited, relaxed = self.clock() - self._last, self._relaxed
        limit = self.timeout.notice_seconds if self.noticed() else self.timeout.seconds
        if relaxed and self.timeout.fixed_s is None and not self.noticed():
            limit = max(limit, STARTUP_ALLOWANCE_S)
        return waited if waited > limit else None

    def check(self) -> HangReport | None:
        """One look: write the report and run `on_hang` when overdue (once)."""
        waited = self.overdue()
        if waited is None or self.fired is not None:
            return None
        inside, where = main_thread_position(self.loop_thread)
        self.fired = HangReport(rank=self.rank, step=self.step, waited_s=round(waited, 1),
                                timeout_s=self.timeout.seconds, in_collective=inside, where=where, at=time.time())
        log.error("rank %d made no progress for %.0f s after step %d (step timeout %.0f s): the loop's thread is %s "
                  "at %s; stopping this worker so that the block fails and is retried", self.rank, waited, self.step,
                  self.timeout.seconds, "waiting in a collective" if inside else "in the loop's code", where)
        try:
            write_report(self.store, self.lineage, self.fence, self.fired)
        except Exception as err:  # noqa: BLE001 - the process still stops; the block then says less
            log.error("could not write the hang report to the store: %s: %s", type(err).__name__, err)
        self.on_hang(self.fired)
        return self.fired

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.check() is not None:
                return

    def close(self) -> None:
        self._stop.set()


def _exit_process(report: HangReport) -> None:
    time.sleep(REPORT_GRACE_S)  # the other ranks' reports: the block task tells the hung rank from them
    logging.shutdown()
    os._exit(1)


def write_report(store: CheckpointStore, lineage: str, fence: int, report: HangReport) -> None:
    folder = report_folder(store, lineage, fence)
    store.fs.makedirs(folder, exist_ok=True)
    store.fs.pipe(f"{folder}/rank-{report.rank:05d}.json", report.model_dump_json().encode())


def read_reports(store: CheckpointStore, lineage: str, fence: int, since: float = 0.0) -> list[HangReport]:
    """The hang reports of the run holding lease `fence` written after `since` (time.time())."""
    folder = report_folder(store, lineage, fence)
    store.fs.invalidate_cache(folder)
    try:
        names = sorted(store.fs.ls(folder, detail=False))
    except FileNotFoundError:
        return []
    reports = []
    for name in names:
        try:
            report = HangReport.model_validate(json.loads(store.fs.cat_file(name)))
        except (OSError, ValueError) as err:
            log.warning("unreadable hang report %s: %s", name, err)
            continue
        if report.at >= since:
            reports.append(report)
    return reports


def clear_reports(store: CheckpointStore, lineage: str, fence: int) -> None:
    try:
        store.fs.rm(report_folder(store, lineage, fence), recursive=True)
    except FileNotFoundError:
        pass


def describe_hang(reports: list[HangReport], world_size: int) -> str | None:
    """The block's failure in one line: which rank hung and where, from the ranks' reports."""
    if not reports:
        return None
    reported = {r.rank for r in reports}
    hung = [r for r in reports if not r.in_collective]
    silent = sorted(set(range(world_size)) - reported)
    first = min(reports, key=lambda r: r.step)
    if hung:
        names = ", ".join(f"rank {r.rank} (at {r.where})" for r in sorted(hung, key=lambda r: r.rank))
    elif silent:
        names = ", ".join(f"rank {r}" for r in silent) + " (wrote no report)"
    else:
        names = "no single rank (every rank waits in a collective)"
    return (f"a rank hung: {names} did not reach step {first.step + 1} within the step timeout of "
            f"{first.timeout_s:.0f} s; nothing of that step was committed; the block is retried from the last "
            f"checkpoint. Set step_timeout_s to change the timeout")
