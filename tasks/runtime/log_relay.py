"""The workers' `baton.worker` log lines (the resume point, "block N ready to train in N s",
warnings), relayed to the block task, which logs them through Prefect's run logger: so they reach
the flow run's logs in the UI, not only the Ray workers' own output.

`install` is the job's Ray `worker_process_setup_hook` (set by the train flow), so it runs in every
worker process of the job, whether a block trains in a fresh fit or in a warm worker group. The
queue is a named Ray actor per job that the block task creates; a worker looks it up at each record
(records are few), so a queue that was replaced is never written to through a stale handle.
This module imports nothing heavy: it runs at the start of every worker process.
"""

from __future__ import annotations

import logging

QUEUE_PREFIX = "baton-worker-logs-"


def queue_name() -> str:
    import ray

    return QUEUE_PREFIX + ray.get_runtime_context().get_job_id()


class _Relay(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            import ray

            queue = ray.get_actor(queue_name())
            # Fire and forget: calls from one process to one actor keep their order.
            queue.put_nowait.remote((record.levelno, record.getMessage()))
        except Exception:  # no block task listening (run_local, a test): the line stays local
            pass


def install() -> None:
    """Relay this process's `baton.worker` records at INFO and above (idempotent)."""
    logger = logging.getLogger("baton.worker")
    if not any(isinstance(handler, _Relay) for handler in logger.handlers):
        logger.addHandler(_Relay(logging.INFO))
