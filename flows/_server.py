"""One Prefect API for the whole run, shared with the Ray workers.

Without PREFECT_API_URL every process that runs a flow or task starts its own temporary server;
under RayTaskRunner that is every Ray worker (17 s and 2 GB instead of 3 s and 1.2 GB, FACTS.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
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


class TemporaryServer:
    """A local Prefect server process for one run: what Prefect's own `SubprocessASGIServer` runs
    (uvicorn on Prefect's app factory, UI off, marked ephemeral), launched by Baton itself so that
    `baton train` can launch it first thing, before importing Prefect, torch or Ray (~4 s here),
    and wait for it only when the flow starts. Launching imports nothing."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.process: subprocess.Popen | None = None
        self.launched_at = 0.0

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def launch(self, output: Path | None = None) -> "TemporaryServer":
        """Start the process; its output goes to `output` (appended) or where this process's goes."""
        import atexit
        import importlib.util

        prefect_dir = os.path.dirname(os.path.dirname(importlib.util.find_spec("prefect").origin))
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        self.launched_at = time.monotonic()
        sink = None
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            sink = open(output, "ab")
            sink.write(f"baton: starting a temporary Prefect server on http://127.0.0.1:{self.port}\n".encode())
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", prefect_dir, "--factory",
                 "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                 "--log-level", "error", "--lifespan", "on"], env=env, stdout=sink, stderr=sink)
        finally:
            if sink is not None:
                sink.close()  # the child has its own copy
        atexit.register(self.stop)
        return self

    def wait(self, timeout_s: float) -> None:
        """Until the API answers; RuntimeError if it does not within `timeout_s` or the process ends."""
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll() if self.process is not None else -1
            if code is not None:
                raise RuntimeError(f"the server process exited with code {code}"
                                   + (" (port in use)" if code == 3 else ""))
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("no answer in time")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_temporary_server(output: Path | None = None) -> TemporaryServer | None:
    """Launch the run's server now, unless PREFECT_API_URL names one (None then)."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    return TemporaryServer().launch(output)


def start_temporary_server(alongside: Callable[[], object] | None = None,
                           launched: TemporaryServer | None = None) -> TemporaryServer:
    """The run's local Prefect server, answering: `launched` (or one launched now), waited for up
    to the startup timeout, tried twice (the second time on a fresh port). Raises ServerStartError
    naming the setting to raise.

    `alongside` runs while the first try starts (Ray, say: the two starts take about as long as
    each other and mostly wait). PREFECT_API_URL is set before it runs, so what it starts already
    knows the API; a second try on a fresh port sets it again."""
    timeout = startup_timeout_s()
    errors = []
    server = launched or TemporaryServer().launch()
    for attempt in range(STARTUP_ATTEMPTS):
        if attempt:
            server = TemporaryServer().launch()
        os.environ["PREFECT_API_URL"] = server.api_url
        if attempt == 0 and alongside is not None:
            try:
                alongside()
            except BaseException:
                server.stop()
                os.environ.pop("PREFECT_API_URL", None)
                raise
        try:
            server.wait(max(0.0, timeout - (time.monotonic() - server.launched_at)))
        except Exception as err:
            errors.append(str(err))
            server.stop()
            continue
        STARTUP_S["Prefect server"] = time.monotonic() - server.launched_at
        return server
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
def prefect_api(alongside: Callable[[], object] | None = None,
                launched: TemporaryServer | None = None) -> Iterator[str]:
    """Use PREFECT_API_URL if set; otherwise start a local server for the run (or wait for the one
    `launched` earlier) and point at it. `alongside` runs while the server starts (or at once,
    when there is none to start)."""
    existing = os.environ.get("PREFECT_API_URL")
    if existing and launched is None:
        if alongside is not None:
            alongside()
        yield existing
        return
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # The environment variable reaches the Ray workers (they inherit it); the setting this process.
    server = start_temporary_server(alongside, launched)
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
