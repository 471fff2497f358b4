"""What `baton train` shows on a terminal: Baton's lines, a live progress display, a short summary.

Everything the process and its children write (Ray's start-up banners, its forwarded worker output
such as `Reporting training result ... TrainingReport(...)`, C++ `core_worker.cc` lines, Prefect's
own chatter) goes to a log file, in full; only the flow's and the block tasks' run-log lines reach
the terminal, shortened. The redirection is at the file-descriptor level because much of that output
is written by C++ code and by Ray's log-forwarding thread, not through Python's logging.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Ray prefixes forwarded lines with "(ActorOrTask pid=N[, ip=...])"; deduplicated ones end in
# "[repeated Nx across cluster]".
_RAY_PREFIX = re.compile(r"^\((?P<source>[^()]*?) pid=\d+(?:, ip=[^()]*)?\)\s?")
_PREFECT_RUN_LINE = re.compile(r"^(?P<time>\d\d:\d\d:\d\d)(?:\.\d+)? \| (?P<level>[A-Z]+)\s*\| "
                               r"(?:(?P<kind>Flow run|Task run) '(?P<name>[^']*)'|(?P<logger>[\w.]+)) - (?P<message>.*)$")
# Besides the run loggers, Baton's own loggers (in Prefect's format when Prefect set up logging).
_BATON_LOGGERS = ("ckpt", "tasks", "flows", "baton")
# Run-log lines that say nothing a person at the terminal needs (they stay in the log and the UI).
# A failure is told once, by `baton train` itself, in one line (the tracebacks stay in the log).
_QUIET_MESSAGES = ("Finished in state ", "Beginning flow run", "effective config:", "Created task run",
                   "Submitting task", "Task run failed with exception", "Encountered exception during execution")


def baton_line(raw: str) -> str | None:
    """The terminal form of one line of output, or None when it is not Baton's (Ray's and
    Prefect's own chatter, tracebacks): a flow or block task's run-log line, shortened."""
    line = _RAY_PREFIX.sub("", _ANSI.sub("", raw).rstrip("\r\n"), count=1)
    found = _PREFECT_RUN_LINE.match(line)
    if found is None or (found["logger"] and found["logger"].split(".")[0] not in _BATON_LOGGERS):
        return None
    message = found["message"].removesuffix(" [repeated 2x across cluster]")
    if message.startswith(_QUIET_MESSAGES):
        return None
    level = "" if found["level"] == "INFO" else f"{found['level']}: "
    where = f"{found['name']}: " if found["kind"] == "Task run" else ""
    return f"{found['time']} {level}{where}{message}"


def default_log_path(lineage: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir()) / "baton" / f"train-{lineage}-{stamp}-{os.getpid()}.log"


class QuietOutput:
    """Sends file descriptors 1 and 2 (this process's and its children's output) to a log file,
    passing the lines `keep` returns text for to `show`. `stdout`/`stderr` write to the terminal."""

    def __init__(self, log_path: Path, show: Callable[[str], None], keep=baton_line):
        self.log_path, self.show, self.keep = log_path, show, keep
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
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                self._log.write(chunk)
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    self._keep(line)
            if pending:
                self._keep(pending)

    def _keep(self, line: bytes) -> None:
        try:
            text = self.keep(line.decode("utf-8", errors="replace"))
            if text is not None:
                self.show(text)
        except Exception:  # showing a line must never stop the log from being written
            pass

    def __exit__(self, *exc) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # What is written from now on (Ray's and Prefect's exit handlers) goes to the log only; child
        # processes that inherited the pipe keep it open, so the pump is not waited for long.
        os.dup2(self._log.fileno(), 1)
        os.dup2(self._log.fileno(), 2)
        if self._thread is not None:
            self._thread.join(timeout=2)


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    value = max(0.0, value)
    if value < 90:
        return f"{value:.0f} s"
    if value < 5400:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


def _metrics_text(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())) or "-"


class TrainMonitor:
    """Where the lineage stands, from the store: a live line on a terminal (epoch, step, loss,
    time since the last commit, ETA), one plain line per commit otherwise."""

    def __init__(self, store, lineage: str, epochs: int, console: Console, live: bool, poll_s: float = 1.0):
        self.store, self.lineage, self.epochs, self.console = store, lineage, epochs, console
        self.poll_s, self.started = poll_s, time.monotonic()
        self.latest = None
        self.epochs_before: int | None = None
        self.first_epoch_at: float | None = None  # when this run's first epoch was committed
        self.first_done = 0  # epochs done then
        self.last_epoch_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="baton-progress")
        # No redirection of sys.stdout/sys.stderr by rich: they lead to the log file (QuietOutput).
        self._live = Live(console=console, refresh_per_second=2, transient=True, redirect_stdout=False,
                          redirect_stderr=False,
                          get_renderable=self.render) if live else None

    def print(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def __enter__(self) -> "TrainMonitor":
        if self._live is not None:
            self._live.start()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.poll()  # where the run ended, even when its last commits came within one poll
        except Exception:
            pass
        if self._live is not None:
            self._live.stop()

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
        if latest is None or (self.latest is not None and latest.id == self.latest.id):
            return
        now = time.monotonic()
        if done > (self.latest.epochs_done if self.latest else self.epochs_before):
            if self.first_epoch_at is None:
                self.first_epoch_at, self.first_done = now, done
            self.last_epoch_at = now
        self.latest = latest
        if self._live is None:
            self.print(f"{datetime.now():%H:%M:%S} progress: {self.status()}")

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
        since = (datetime.now(timezone.utc) - m.created_at).total_seconds()
        return (f"epoch {m.epochs_done} of {self.epochs}, step {m.step}, {_metrics_text(m.metrics)}, "
                f"last commit {_seconds(since)} ago, ETA {_seconds(self.eta_s())}")

    def render(self):
        m = self.latest
        done = m.epochs_done if m else 0
        width = 24
        filled = int(width * min(done, self.epochs) / self.epochs)
        line = Text()
        line.append(f"{self.lineage} ", style="bold")
        line.append("━" * filled, style="green")
        line.append("━" * (width - filled), style="grey50")
        line.append(f" epoch {done}/{self.epochs}")
        if m is not None:
            since = (datetime.now(timezone.utc) - m.created_at).total_seconds()
            line.append(f"  step {m.step}  {_metrics_text(m.metrics)}  last commit {_seconds(since)} ago")
        line.append(f"  ETA {_seconds(self.eta_s())}  elapsed {_seconds(time.monotonic() - self.started)}")
        return line


def summary_table(summary, log_path: Path | None) -> Table:
    """The end of a run in a few rows, numbers rounded: what a person reads at the terminal."""
    final = summary.final
    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("lineage", summary.lineage)
    table.add_row("epochs", f"{final.epochs_done if final else 0} of {summary.epochs} "
                  f"({summary.epochs_trained} trained in {summary.blocks_trained} block(s))")
    table.add_row("time", _seconds(summary.wall_time_s) if summary.wall_time_s >= 90 else f"{summary.wall_time_s:.1f} s")
    if final:
        table.add_row("checkpoint", f"{final.id} (step {final.step})")
        table.add_row("metrics", _metrics_text(final.metrics))
        table.add_row("location", final.uri)
    if log_path is not None:
        table.add_row("full log", str(log_path))
    return table
