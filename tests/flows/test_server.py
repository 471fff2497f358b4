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
