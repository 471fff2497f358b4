"""One Prefect API for the whole run, shared with the Ray workers.

Without PREFECT_API_URL every process that runs a flow or task starts its own temporary server;
under RayTaskRunner that is every Ray worker (17 s and 2 GB instead of 3 s and 1.2 GB, FACTS.md).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """Use PREFECT_API_URL if set; otherwise start a local server for the run and point at it."""
    existing = os.environ.get("PREFECT_API_URL")
    if existing:
        yield existing
        return
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start()
    # The environment variable reaches the Ray workers (they inherit it); the setting this process.
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        _drain_prefect_workers()
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def _drain_prefect_workers() -> None:
    # Ship queued logs and events while the server still answers; afterwards they retry
    # against a closed port at exit.
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=10)
        except Exception:
            pass
