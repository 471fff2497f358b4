"""Real local Google Cloud Storage and Azure Blob emulators for tests, one of each per session:
fake-gcs-server (``scripts/gcs-server``) and Azurite (``scripts/azure-server``), on 127.0.0.1.

The fixtures ``gcs_env`` / ``azure_env`` start them (a server already answering is reused) and put
the standard variables the stores read (STORAGE_EMULATOR_HOST, AZURE_STORAGE_CONNECTION_STRING)
into this process's environment; ``gcs_store`` / ``azure_store`` are a fresh bucket / container.
On CI (``CI`` set) a server that fails to start fails the tests; elsewhere they skip, saying why.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def ensure_server(script: str, needs: str, timeout: float = 300) -> dict[str, str]:
    """Run ``scripts/<script> start``; return the variables its ``export`` lines set."""
    path = SCRIPTS / script
    try:
        proc = subprocess.run([str(path), "start"], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"{path} start failed: {err!r}") from err
    env: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("export ") and "=" in line:
            key, _, value = line[len("export "):].partition("=")
            env[key.strip()] = " ".join(shlex.split(value))
    if proc.returncode != 0 or needs not in env:
        raise RuntimeError(f"{path} start failed (rc={proc.returncode})\n--- stdout\n{proc.stdout}\n"
                           f"--- stderr\n{proc.stderr}")
    return env


def _session_env(script: str, needs: str, what: str) -> dict[str, str]:
    try:
        env = ensure_server(script, needs)
    except RuntimeError as err:
        if os.environ.get("CI"):
            raise  # CI installs and starts the emulator: there, a failure to start is a failure
        pytest.skip(f"no local {what} could be started (scripts/{script}; CI runs these tests): "
                    f"{str(err).splitlines()[0]}")
    os.environ.update(env)  # in-process stores read the standard variables, as users' do
    return env


def unique_name(request, prefix: str) -> str:
    """A bucket or container name from the test's name: lowercase letters, digits and single
    dashes, at most 63 characters (what both services accept)."""
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    return f"{prefix}-{base}-{os.urandom(3).hex()}"


@pytest.fixture(scope="session")
def gcs_env() -> dict[str, str]:
    """fake-gcs-server on 127.0.0.1 (scripts/gcs-server): STORAGE_EMULATOR_HOST."""
    return _session_env("gcs-server", "STORAGE_EMULATOR_HOST", "GCS emulator (fake-gcs-server)")


@pytest.fixture(scope="session")
def azure_env() -> dict[str, str]:
    """Azurite's blob service on 127.0.0.1 (scripts/azure-server): AZURE_STORAGE_CONNECTION_STRING."""
    return _session_env("azure-server", "AZURE_STORAGE_CONNECTION_STRING", "Azure Blob emulator (Azurite)")


@pytest.fixture
def gcs_store(gcs_env, request) -> str:
    """A fresh bucket: ``gs://NAME``."""
    from ckpt import CheckpointStore

    name = unique_name(request, "t")
    CheckpointStore(f"gs://{name}").fs.mkdir(name)
    return f"gs://{name}"


@pytest.fixture
def azure_store(azure_env, request) -> str:
    """A fresh container: ``az://NAME``."""
    from ckpt import CheckpointStore

    name = unique_name(request, "t")
    CheckpointStore(f"az://{name}").fs.mkdir(name)
    return f"az://{name}"
