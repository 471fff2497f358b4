"""One Prefect API for the whole run, shared with the Ray workers.

Without PREFECT_API_URL every process that runs a flow or task starts its own temporary server;
under RayTaskRunner that is every Ray worker (17 s and 2 GB instead of 3 s and 1.2 GB, FACTS.md).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

# Prefect's own setting, read here with a longer default than Prefect's 20 s: idle, the server
# answers in ~11 s on 2 cores; under load (load average 10-20) 20 s was too short 3 times in a dozen.
STARTUP_TIMEOUT_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_STARTUP_TIMEOUT_S = 90.0
STARTUP_ATTEMPTS = 2


class ServerStartError(RuntimeError):
    """The temporary Prefect server did not come up; the message says what to change."""


def startup_timeout_s() -> float:
    value = os.environ.get(STARTUP_TIMEOUT_SETTING)
    if not value:
        return DEFAULT_STARTUP_TIMEOUT_S
    try:
        return float(int(value))  # Prefect itself reads the setting as an integer
    except ValueError:
        raise ServerStartError(f"{STARTUP_TIMEOUT_SETTING}={value!r} is not a whole number of seconds") from None


def start_temporary_server():
    """A local Prefect server on a free port, waited for up to the startup timeout, tried twice
    (the second time on a fresh port). Raises ServerStartError naming the setting to raise."""
    from prefect.server.api.server import SubprocessASGIServer

    timeout = startup_timeout_s()
    errors = []
    for _ in range(STARTUP_ATTEMPTS):
        server = SubprocessASGIServer()
        try:
            # Prefect counts only its 0.1 s sleeps toward the timeout; an int is what it expects.
            server.start(timeout=max(1, round(timeout)))
            return server
        except Exception as err:  # Prefect raises RuntimeError with the server's output
            errors.append(str(err).splitlines()[0] if str(err) else type(err).__name__)
            server.stop()  # Prefect leaves a server that did not answer in time running
    raise ServerStartError(
        f"the temporary Prefect server did not answer within {timeout:g} s ({STARTUP_ATTEMPTS} tries: "
        f"{'; '.join(errors)}). To resolve this: 1. on a busy machine, wait longer: set "
        f"{STARTUP_TIMEOUT_SETTING} (now {timeout:g}); 2. or start a server once (prefect server start) "
        "and set PREFECT_API_URL (for example http://127.0.0.1:4200/api).")


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """Use PREFECT_API_URL if set; otherwise start a local server for the run and point at it."""
    existing = os.environ.get("PREFECT_API_URL")
    if existing:
        yield existing
        return
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = start_temporary_server()
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
