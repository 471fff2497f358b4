"""The temporary Prefect server: a wait that is too short fails with a message naming the
setting to change, tries again on a fresh port, and leaves no server process behind."""

from __future__ import annotations

import os

import subprocess
import pytest

from flows._server import STARTUP_TIMEOUT_SETTING, ServerStartError, prefect_api, startup_timeout_s


def _uvicorn_children() -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(os.getpid())], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if "uvicorn" in line]


@pytest.mark.slow
def test_a_server_that_does_not_answer_in_time_fails_naming_the_setting_and_is_stopped(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv(STARTUP_TIMEOUT_SETTING, "1")  # far below the ~11 s a start takes here
    with pytest.raises(ServerStartError) as caught:
        with prefect_api():
            pytest.fail("the server cannot have answered")
    message = str(caught.value)
    assert STARTUP_TIMEOUT_SETTING in message and "2 tries" in message and "PREFECT_API_URL" in message
    assert "PREFECT_API_URL" not in os.environ
    assert _uvicorn_children() == []


def test_the_startup_wait_defaults_to_longer_than_prefects_twenty_seconds(monkeypatch):
    monkeypatch.delenv(STARTUP_TIMEOUT_SETTING, raising=False)
    assert startup_timeout_s() >= 60
    monkeypatch.setenv(STARTUP_TIMEOUT_SETTING, "abc")
    with pytest.raises(ServerStartError, match=STARTUP_TIMEOUT_SETTING):
        startup_timeout_s()


def _answers(api_url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_what_starts_alongside_runs_while_the_server_starts_knows_its_url_and_a_failure_stops_it(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    seen: dict[str, object] = {}

    def alongside() -> None:  # what `baton train` does here: start Ray
        seen["url"] = os.environ.get("PREFECT_API_URL")
        seen["answering"] = _answers(str(seen["url"]))

    with prefect_api(alongside=alongside) as url:
        assert seen == {"url": url, "answering": False}  # ran before the server answered, knowing where it will
        assert _answers(url)
    assert "PREFECT_API_URL" not in os.environ and _uvicorn_children() == []

    def broken() -> None:
        raise RuntimeError("ray.init failed")

    with pytest.raises(RuntimeError, match="ray.init failed"):
        with prefect_api(alongside=broken):
            pytest.fail("the run cannot start without what starts alongside")
    assert "PREFECT_API_URL" not in os.environ and _uvicorn_children() == []


# A `baton` stand-in: launches the run's temporary server, says its pid and sessions, waits.
LAUNCHER = """
import os, time
from flows._server import TemporaryServer
server = TemporaryServer().launch()
print(server.process.pid, os.getsid(server.process.pid), os.getsid(0), flush=True)
time.sleep(120)
"""


def test_the_temporary_server_has_a_session_of_its_own_and_dies_with_the_process_that_launched_it(tmp_path):
    import signal
    import sys
    import time
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path)
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], cwd=Path(__file__).resolve().parents[2],
                                env=env, stdout=subprocess.PIPE, text=True)
    try:
        server, server_session, launcher_session = map(int, launcher.stdout.readline().split())
        assert server_session == server != launcher_session  # a terminal's Ctrl-C or hang-up does not reach it
        launcher.send_signal(signal.SIGKILL)  # no atexit, no handler: only the kernel can stop it now
        launcher.wait(10)
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{server}") and _state(server) != "Z" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{server}") or _state(server) == "Z", "the server outlived baton"
    finally:
        launcher.kill()
        launcher.wait(10)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
