"""What `baton train` shows on a terminal: Baton's lines, a live progress display, a short summary.

Everything the process and its children write (Ray's start-up banners, its forwarded worker output
such as `Reporting training result ... TrainingReport(...)`, C++ `core_worker.cc` lines, Prefect's
own chatter) goes to a log file, in full. The redirection is at the file-descriptor level because
much of that output is written by C++ code and by Ray's log-forwarding thread, not through Python's
logging. The lines a person reads come from structured log records instead (`_run_log.RunLog`: the
flow's and the block tasks' run logs), the progress from the store.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.text import Text

from ckpt.retention import format_duration


def default_log_path(lineage: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir()) / "baton" / f"train-{lineage}-{stamp}-{os.getpid()}.log"


class QuietOutput:
    """Sends file descriptors 1 and 2 (this process's and its children's output) to a log file.
    `stdout`/`stderr` write to the terminal."""

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.stdout: TextIO = sys.stdout
        self.stderr: TextIO = sys.stderr
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "QuietOutput":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab", buffering=0)
        sys.stdout.flush()
        sys.stderr.flush()
        self.stdout = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        self.stderr = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
        read_end, write_end = os.pipe()
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        self._thread = threading.Thread(target=self._pump, args=(read_end,), daemon=True, name="baton-output")
        self._thread.start()
        return self

    def _pump(self, read_end: int) -> None:
        # Through a pipe rather than straight to the file: the fds keep one writer that this
        # process can point elsewhere at exit, whatever the children hold.
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                self._log.write(chunk)

    def __exit__(self, *exc) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # What is written from now on (Ray's and Prefect's exit handlers) goes to the log only; child
        # processes that inherited the pipe keep it open, so the pump is not waited for long.
        os.dup2(self._log.fileno(), 1)
        os.dup2(self._log.fileno(), 2)
        if self._thread is not None:
            self._thread.join(timeout=2)


def _duration(value: float | None) -> str:
    return "-" if value is None else format_duration(round(value))


def _metrics_text(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())) or "-"


def _fixed() -> Column:
    return Column(no_wrap=True)


class _CommitColumn(ProgressColumn):
    """Step, metrics and the time since the last commit (it grows between refreshes)."""

    def __init__(self, monitor: "TrainMonitor"):
        super().__init__()
        self.monitor = monitor

    def render(self, task) -> Text:
        m = self.monitor.latest
        # On a narrow terminal this column gives way (cut short, with the bar), so the display
        # stays one line: the other columns do not wrap.
        text = "nothing committed yet" if m is None else (
            f"step {m.step}  {_metrics_text(m.metrics)}  last commit {_duration(self.monitor.since_commit_s())} ago")
        return Text(text, no_wrap=True, overflow="ellipsis")


class _EtaColumn(ProgressColumn):
    """Baton's ETA: the rate between this run's commits, so start-up is not counted per epoch
    (rich's TimeRemainingColumn averages the whole task, start-up included)."""

    def __init__(self, monitor: "TrainMonitor"):
        super().__init__(table_column=_fixed())
        self.monitor = monitor

    def render(self, task) -> Text:
        return Text(f"ETA {_duration(self.monitor.eta_s())}", no_wrap=True)


class TrainMonitor:
    """Where the lineage stands, from the store: a live progress display on a terminal (bar, epochs,
    step, loss, time since the last commit, ETA, elapsed), one plain line per commit otherwise."""

    def __init__(self, store, lineage: str, epochs: int, console: Console, live: bool, poll_s: float = 1.0):
        self.store, self.lineage, self.epochs, self.console = store, lineage, epochs, console
        self.poll_s, self.started, self.live = poll_s, time.monotonic(), live
        self.latest = None
        self.epochs_before: int | None = None
        self.first_epoch_at: float | None = None  # when this run's first epoch was committed
        self.first_done = 0  # epochs done then
        self.last_epoch_at: float | None = None
        # Where plain progress lines go (off a terminal): printed, or merged into the run's lines.
        self.say: Callable[[datetime, str], None] = lambda when, text: self.print(text)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="baton-progress")
        # No redirection of sys.stdout/sys.stderr by rich: they lead to the log file (QuietOutput).
        self.progress = Progress(
            TextColumn("{task.description}", style="bold", markup=False, table_column=_fixed()),
            BarColumn(bar_width=24), TextColumn("epoch", table_column=_fixed()),
            MofNCompleteColumn(table_column=_fixed()), _CommitColumn(self), _EtaColumn(self),
            TextColumn("elapsed", table_column=_fixed()), TimeElapsedColumn(table_column=_fixed()),
            console=console, transient=True, auto_refresh=live, refresh_per_second=2,
            redirect_stdout=False, redirect_stderr=False)
        self.task = self.progress.add_task(lineage, total=epochs)

    def print(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def __enter__(self) -> "TrainMonitor":
        if self.live:
            self.progress.start()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.poll()  # where the run ended, even when its last commits came within one poll
        except Exception:
            pass
        if self.live:
            self.progress.stop()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # a listing error must not stop training or the display
                pass

    def poll(self) -> None:
        latest = self.store.latest(self.lineage)
        done = latest.epochs_done if latest else 0
        if self.epochs_before is None:
            self.epochs_before = done
            self.progress.update(self.task, completed=min(done, self.epochs))
        if latest is None or (self.latest is not None and latest.id == self.latest.id):
            return
        now = time.monotonic()
        if done > (self.latest.epochs_done if self.latest else self.epochs_before):
            if self.first_epoch_at is None:
                self.first_epoch_at, self.first_done = now, done
            self.last_epoch_at = now
        self.latest = latest
        self.progress.update(self.task, completed=min(done, self.epochs))
        if not self.live:
            stamp = datetime.now().astimezone()
            self.say(stamp, f"{stamp:%H:%M:%S} progress: {self.status()}")

    def since_commit_s(self) -> float | None:
        if self.latest is None:
            return None
        return (datetime.now(timezone.utc) - self.latest.created_at).total_seconds()

    def eta_s(self) -> float | None:
        """Seconds per epoch measured in this run, times the epochs left."""
        if self.latest is None or self.last_epoch_at is None or self.epochs_before is None:
            return None
        trained = self.latest.epochs_done - self.epochs_before
        if trained <= 0:
            return None
        # From the second epoch on, the rate between this run's commits: start-up is not repeated.
        since_first = self.latest.epochs_done - self.first_done
        if since_first >= 1 and self.first_epoch_at is not None and self.last_epoch_at > self.first_epoch_at:
            per_epoch = (self.last_epoch_at - self.first_epoch_at) / since_first
        else:
            per_epoch = (self.last_epoch_at - self.started) / trained
        left = max(0, self.epochs - self.latest.epochs_done)
        return left * per_epoch - (time.monotonic() - self.last_epoch_at) if left else 0.0

    def status(self) -> str:
        m = self.latest
        if m is None:
            return f"epoch 0 of {self.epochs}, nothing committed yet"
        return (f"epoch {m.epochs_done} of {self.epochs}, step {m.step}, {_metrics_text(m.metrics)}, "
                f"last commit {_duration(self.since_commit_s())} ago, ETA {_duration(self.eta_s())}")


def summary_table(summary, log_path: Path | None) -> Table:
    """The end of a run in a few rows, numbers rounded: what a person reads at the terminal."""
    final = summary.final
    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("lineage", summary.lineage)
    table.add_row("epochs", f"{final.epochs_done if final else 0} of {summary.epochs} "
                  f"({summary.epochs_trained} trained in {summary.blocks_trained} block(s))")
    table.add_row("time", format_duration(summary.wall_time_s))
    if final:
        table.add_row("checkpoint", f"{final.id} (step {final.step})")
        table.add_row("metrics", _metrics_text(final.metrics))
        table.add_row("location", final.uri)
    if log_path is not None:
        table.add_row("full log", str(log_path))
    return table
