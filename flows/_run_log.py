"""The run's log lines for the terminal, read from structured log records, in time order.

Two sources: this process's records (the flow run's, and Baton's own `baton.*` warnings), caught by
a logging handler as they are emitted; and the flow run's records from the Prefect API, which is
where the block tasks' records arrive: the tasks run in Ray workers (other processes), whose
Prefect log handler ships them in batches. A line is held back `hold_s` before it is shown, so a
worker's line that reaches the API a batch late still comes out in timestamp order; `finish` reads
the API a last time (while its server still answers) and shows everything left, in order.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Callable, NamedTuple
from uuid import UUID

# Run-log lines that say nothing a person at the terminal needs (they stay in the log and the UI).
# A failure is told once, by `baton train` itself, in one line (the tracebacks stay in the log).
QUIET_MESSAGES = ("Finished in state ", "Beginning flow run", "effective config:", "Created task run",
                  "Submitting task", "Task run failed with exception", "Encountered exception during execution")
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
BATON_LOGGER = "baton"
# How far back each API read starts, before the newest record already read: a worker's batch can
# reach the API after records stamped later (the ids already read are skipped).
_REREAD_S = 10.0


class RunLine(NamedTuple):
    """One log record, as much of it as the terminal uses."""
    when: datetime  # timezone-aware
    level: int
    message: str
    task: str | None = None  # the task run's name ("block-0"), None for the flow's own records


def terminal_line(line: RunLine) -> str | None:
    """'HH:MM:SS [LEVEL: ][block-N: ]message' in local time, or None for a line not worth showing.
    Only a message's first line: tracebacks stay in the log file and the UI."""
    message = line.message.split("\n", 1)[0].rstrip()
    if line.level < logging.INFO or not message or message.startswith(QUIET_MESSAGES):
        return None
    level = "" if line.level == logging.INFO else f"{logging.getLevelName(line.level)}: "
    where = f"{line.task}: " if line.task else ""
    return f"{line.when.astimezone():%H:%M:%S} {level}{where}{message}"


def from_record(record: logging.LogRecord) -> RunLine:
    """A record emitted in this process; a task run's carries its name (Prefect's run logger)."""
    when = datetime.fromtimestamp(record.created, timezone.utc)
    return RunLine(when, record.levelno, record.getMessage(), getattr(record, "task_run_name", None))


def from_log(log, task: str | None) -> RunLine:
    """A record read from the Prefect API (`prefect.client.schemas.objects.Log`), of task `task`."""
    return RunLine(log.timestamp, log.level, log.message, task)


def _key(line: RunLine) -> tuple[float, str]:
    # The API stores a record's `created` time as its timestamp: the same record read twice
    # (emitted here, then read back from the API) has the same key.
    return round(line.when.timestamp(), 3), line.message.split("\n", 1)[0]


class _Handler(logging.Handler):
    def __init__(self, feed: "RunLog"):
        super().__init__(logging.NOTSET)
        self.feed = feed

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.feed.add_local(record)
        except Exception:  # a line the terminal cannot show must never disturb the run
            pass


class RunLog:
    """Shows the flow run's log lines through `show`, ordered by timestamp (see the module)."""

    def __init__(self, show: Callable[[str], None], poll_s: float = 0.5, hold_s: float = 1.5):
        self.show, self.poll_s, self.hold_s = show, poll_s, hold_s
        self.flow_run_id: UUID | None = None
        self.api_url: str | None = None
        self._pending: list[tuple[float, int, str]] = []
        self._order = itertools.count()
        self._seen_keys: set[tuple[float, str]] = set()
        self._seen_ids: set[UUID] = set()
        self._task_names: dict[UUID, str] = {}
        self._newest: datetime | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._handler = _Handler(self)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="baton-run-log")
        self._finished = False

    def __enter__(self) -> "RunLog":
        from prefect.logging.configuration import ensure_logging_setup

        # Prefect's logging set-up replaces the handlers of its loggers (dictConfig): it must come
        # first, or this handler is dropped when the flow starts.
        ensure_logging_setup()
        for name in (*RUN_LOGGERS, BATON_LOGGER):
            logging.getLogger(name).addHandler(self._handler)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.finish(read_api=False)
        for name in (*RUN_LOGGERS, BATON_LOGGER):
            logging.getLogger(name).removeHandler(self._handler)

    def around(self, flow_fn):
        """`flow_fn`, then the run's last lines read from the API while its server still answers
        (the caller stops a temporary server as soon as the flow returns)."""
        import sys

        def run(**params):
            try:
                return flow_fn(**params)
            finally:  # a second Ctrl-C exits now: no wait for the server then
                self.finish(read_api=not isinstance(sys.exc_info()[1], KeyboardInterrupt))

        run.name = flow_fn.name
        return run

    def add_local(self, record: logging.LogRecord) -> None:
        if self.flow_run_id is None and record.name == "prefect.flow_runs":
            self._learn_flow_run(record)
        self.add(from_record(record))

    def _learn_flow_run(self, record: logging.LogRecord) -> None:
        # Emitted in the flow's thread, where Prefect's settings name the run's API.
        from prefect.settings import PREFECT_API_URL

        try:
            self.flow_run_id = UUID(str(getattr(record, "flow_run_id", "")))
        except ValueError:  # "<unknown>": a flow with no run
            return
        self.api_url = PREFECT_API_URL.value()

    def add(self, line: RunLine) -> None:
        with self._lock:
            key = _key(line)
            if key in self._seen_keys:
                return
            self._seen_keys.add(key)
        text = terminal_line(line)
        if text is not None:
            self.add_text(line.when, text)

    def add_text(self, when: datetime, text: str) -> None:
        """A line of the terminal's own (a progress line), shown in its place among the run's."""
        with self._lock:
            heapq.heappush(self._pending, (when.timestamp(), next(self._order), text))
        if self._finished:  # nothing is held back any longer
            self.release()

    def release(self, older_than: float | None = None) -> None:
        """Show the held lines stamped before `older_than` (all of them when None), oldest first."""
        while True:
            with self._lock:
                if not self._pending or (older_than is not None and self._pending[0][0] > older_than):
                    return
                text = heapq.heappop(self._pending)[2]
            try:
                self.show(text)
            except Exception:
                pass

    def finish(self, read_api: bool = True) -> None:
        """The last read of the API, then every line left, in order (idempotent)."""
        if self._finished:
            return
        self._finished = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if read_api:
            self._read_api_safely()
        self.release()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._read_api_safely()
            self.release(older_than=time.time() - self.hold_s)

    def _read_api_safely(self) -> None:
        try:
            self.read_api()
        except Exception:  # the server is busy or gone: the next read (or the UI) has the lines
            pass

    def read_api(self) -> None:
        """Add the flow run's records that other processes (the block tasks) sent to the API."""
        if self.flow_run_id is None or not self.api_url:
            return
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.api_url}), \
                get_client(sync_client=True, httpx_settings={"timeout": 5}) as client:
            for log in self._new_logs(client):
                if log.task_run_id is None:  # the flow's own records: the handler caught them here
                    continue
                self.add(from_log(log, self._task_name(client, log.task_run_id)))

    def _new_logs(self, client) -> list:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTimestamp
        from prefect.client.schemas.sorting import LogSort

        after = self._newest - timedelta(seconds=_REREAD_S) if self._newest else None
        found, page, offset = [], 200, 0
        log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[self.flow_run_id]),
                               timestamp=LogFilterTimestamp(after_=after))
        while True:
            logs = client.read_logs(log_filter=log_filter, sort=LogSort.TIMESTAMP_ASC, limit=page, offset=offset)
            found += [log for log in logs if log.id not in self._seen_ids]
            self._seen_ids.update(log.id for log in logs)
            if len(logs) < page:
                break
            offset += page
        if found:
            self._newest = max(self._newest or found[-1].timestamp, found[-1].timestamp)
        return found

    def _task_name(self, client, task_run_id: UUID) -> str:
        if task_run_id not in self._task_names:
            try:
                self._task_names[task_run_id] = client.read_task_run(task_run_id).name
            except Exception:
                return "task"  # asked again at its next line
        return self._task_names[task_run_id]
