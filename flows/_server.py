"""One Prefect API for the whole run, shared with the Ray workers.

Without PREFECT_API_URL every process that runs a flow or task starts its own temporary server;
under RayTaskRunner that is every Ray worker (17 s and 2 GB instead of 3 s and 1.2 GB, FACTS.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Callable, Iterator

log = logging.getLogger("baton")
# What this process spent starting things for the run ("Prefect server", "local Ray": seconds),
# told once in the flow run's log (`startup_summary`).
STARTUP_S: dict[str, float] = {}

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


def start_temporary_server(alongside: Callable[[], object] | None = None):
    """A local Prefect server on a free port, waited for up to the startup timeout, tried twice
    (the second time on a fresh port). Raises ServerStartError naming the setting to raise.

    `alongside` runs in this thread while the first try starts (Ray, say: the two starts take
    about as long as each other and mostly wait). PREFECT_API_URL is set before it runs, so what
    it starts already knows the API; a second try on a fresh port sets it again."""
    from prefect.server.api.server import SubprocessASGIServer

    timeout = startup_timeout_s()
    errors = []
    for attempt in range(STARTUP_ATTEMPTS):
        server = SubprocessASGIServer(SubprocessASGIServer().find_available_port())
        os.environ["PREFECT_API_URL"] = server.api_url
        failed: list[Exception] = []

        def start() -> None:
            try:
                # Prefect counts only its 0.1 s sleeps toward the timeout; an int is what it expects.
                server.start(timeout=max(1, round(timeout)))
            except Exception as err:  # Prefect raises RuntimeError with the server's output
                failed.append(err)

        started = time.monotonic()
        if attempt == 0 and alongside is not None:
            starter = threading.Thread(target=start, name="baton-prefect-server", daemon=True)
            starter.start()
            try:
                alongside()
            except BaseException:
                starter.join()
                server.stop()
                os.environ.pop("PREFECT_API_URL", None)
                raise
            starter.join()
        else:
            start()
        if not failed:
            STARTUP_S["Prefect server"] = time.monotonic() - started
            return server
        err = failed[0]
        errors.append(str(err).splitlines()[0] if str(err) else type(err).__name__)
        server.stop()  # Prefect leaves a server that did not answer in time running
    os.environ.pop("PREFECT_API_URL", None)
    raise ServerStartError(
        f"the temporary Prefect server did not answer within {timeout:g} s ({STARTUP_ATTEMPTS} tries: "
        f"{'; '.join(errors)}). To resolve this: 1. on a busy machine, wait longer: set "
        f"{STARTUP_TIMEOUT_SETTING} (now {timeout:g}); 2. or start a server once (prefect server start) "
        "and set PREFECT_API_URL (for example http://127.0.0.1:4200/api).")


def startup_summary() -> str | None:
    """One line on what starting the run's Prefect server and Ray took, once per process."""
    if not STARTUP_S:
        return None
    parts = [f"{name} {seconds:.1f} s" for name, seconds in STARTUP_S.items()]
    together = " (started together)" if len(parts) > 1 else ""
    STARTUP_S.clear()
    return f"start-up: {', '.join(parts)}{together}"


@contextlib.contextmanager
def prefect_api(alongside: Callable[[], object] | None = None) -> Iterator[str]:
    """Use PREFECT_API_URL if set; otherwise start a local server for the run and point at it.
    `alongside` runs while the server starts (or at once, when there is none to start)."""
    existing = os.environ.get("PREFECT_API_URL")
    if existing:
        if alongside is not None:
            alongside()
        yield existing
        return
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # The environment variable reaches the Ray workers (they inherit it); the setting this process.
    server = start_temporary_server(alongside)
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
