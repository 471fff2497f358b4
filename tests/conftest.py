"""Shared fixtures. Fast unit tests run first; integration tests share one Ray cluster
(`ray start`) and one Prefect server (`prefect server start`) per session, both real."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

# The GCS and Azure Blob emulators' fixtures (gcs_env, gcs_store, azure_env, azure_store).
from tests.cloudservers import azure_env, azure_store, gcs_env, gcs_store  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def pytest_collection_modifyitems(config, items):
    # A test that needs the S3 server is an integration test: `-m "not integration"` starts nothing.
    # So is a slow one (multi-process crash trials, timeouts that must run out): the fast tier stays
    # under a minute; the full suite runs them all.
    for item in items:
        if (item.get_closest_marker("s3") or item.get_closest_marker("slow")) and not item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)
    # Fast tests first: they fail in seconds, before any cluster or server starts.
    items.sort(key=lambda item: 1 if item.get_closest_marker("integration") else 0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("baton-session")


@pytest.fixture(scope="session")
def base_env(session_dir: Path) -> dict[str, str]:
    """An environment isolated from the user's: HOME (Ray's auth token), PREFECT_HOME."""
    home = session_dir / "home"
    home.mkdir(exist_ok=True)
    env = dict(os.environ)
    env.update(HOME=str(home), PREFECT_HOME=str(session_dir / "prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1", RAY_AUTH_MODE="token",
               # Ray workers import test recipes (tests.integration.recipes) from the checkout.
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for key in ("PREFECT_API_URL", "RAY_ADDRESS"):
        env.pop(key, None)
    return env


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def prefect_server(base_env: dict[str, str], session_dir: Path):
    port = free_port()
    log = session_dir / "prefect-server.log"
    # The UI asks /ui-settings for the API address, which defaults to port 4200 otherwise.
    env = dict(base_env, PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_http(f"{url}/health", 90, proc, log)
        yield url
    finally:
        _stop_group(proc)


@pytest.fixture(scope="session")
def ray_cluster(base_env: dict[str, str], prefect_server: str, session_dir: Path):
    """A real single-node Ray cluster started with `ray start`, with token authentication on.

    `ray start --block` in its own process group, so that teardown stops this cluster only
    (`ray stop` would stop every Ray cluster on the machine)."""
    port = free_port()
    env = dict(base_env, PREFECT_API_URL=prefect_server, RAY_ADDRESS=f"127.0.0.1:{port}")
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # unix socket paths must stay < 108 bytes
    # Free ports for everything a second cluster on the machine would otherwise also take
    # (even with the dashboard off, its agent still listens on 8265 by default).
    ports = ["--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
    cmd = [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=4", "--block",
           "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
           *(f"{flag}={free_port()}" for flag in ports)]
    # Ray 2.60 has token authentication on: the token lives in $HOME/.ray/auth_token (isolated).
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, capture_output=True,
                   check=True, timeout=60)
    log = session_dir / "ray-start.log"
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ray(env["RAY_ADDRESS"], env, proc, log)
        yield env["RAY_ADDRESS"]
    finally:
        _stop_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_ray(address: str, env: dict[str, str], proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        status = subprocess.run([str(BIN / "ray"), "status", f"--address={address}"], env=env,
                                capture_output=True, text=True, timeout=60)
        if status.returncode == 0 and "CPU" in status.stdout:
            return
        time.sleep(1)
    raise RuntimeError(f"Ray at {address} did not come up within {timeout} s:\n{log.read_text()[-3000:]}")


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def cluster_env(base_env, prefect_server, ray_cluster) -> dict[str, str]:
    """Environment for `baton` processes: the shared Prefect server and Ray cluster."""
    return dict(base_env, PREFECT_API_URL=prefect_server, RAY_ADDRESS=ray_cluster)


@pytest.fixture(scope="session")
def s3_env(base_env) -> dict[str, str]:
    """A real S3 server (Ceph RGW on 127.0.0.1, scripts/s3-server) and its credentials."""
    from tests.s3server import ensure_s3_server

    try:
        env = ensure_s3_server()
    except RuntimeError as err:
        if os.environ.get("CI"):
            raise  # CI installs and starts the server: there, a failure to start is a failure
        pytest.skip(f"no local S3 server could be started (scripts/s3-server needs root and Debian's "
                    f"radosgw/ceph packages; CI runs these tests): {str(err).splitlines()[0]}")
    os.environ.update(env)  # in-process stores read the standard AWS_* variables, as users' do
    return env


@pytest.fixture
def s3_store(s3_env, request) -> str:
    from tests.s3server import new_bucket

    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    name = name.rstrip("-") + "-" + os.urandom(3).hex()
    return new_bucket(s3_env, name)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)
