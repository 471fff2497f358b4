"""One Prefect API for the whole run, shared with the Ray workers.

Without PREFECT_API_URL every process that runs a flow or task starts its own temporary server;
under RayTaskRunner that is every Ray worker (measured with Prefect 3.9 on 2 cores: the first task
result after 17 s and 2 GB instead of 3-4 s and 1.2 GB). So `baton train` starts one server for the
run and points the flow and its Ray workers at it.

The server cannot outlive the command: it runs in a session of its own (a terminal's Ctrl-C or
hang-up reaches `baton` only, which then still needs the server to record how the run ended), and
the kernel SIGKILLs it when `baton` ends, however that happens (a parent-death signal).
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

from . import _prefect_internals
from ._process import die_with_parent_code

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
    `baton train` can launch it first thing, before importing Prefect or Ray (~4 s here), and wait
    for it only when the flow starts. Launching imports nothing. Launch it from the main thread:
    the parent-death signal follows the thread that started the child."""

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
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               **_prefect_internals.server_environment()}
        env.pop("PREFECT_API_URL", None)
        self.launched_at = time.monotonic()
        sink = None
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            sink = open(output, "ab")
            sink.write(f"baton: starting a temporary Prefect server on http://127.0.0.1:{self.port}\n".encode())
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", die_with_parent_code(os.getpid(), "uvicorn"), "--app-dir", prefect_dir,
                 "--factory", _prefect_internals.SERVER_APP_FACTORY, "--host", "127.0.0.1", "--port",
                 str(self.port), "--log-level", "error", "--lifespan", "on"],
                env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, start_new_session=True)
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
    try:
        _prefect_internals.drain_log_and_event_workers(timeout_s=10)
    except Exception as err:  # what is left retries at exit against a closed port: noise in the log only
        log.debug("could not ship Prefect's queued logs and events: %s", err)
