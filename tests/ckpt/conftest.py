"""The store backends every store and lease test runs against: a local folder, `memory://` and the
real S3 server, the GCS emulator and the Azure Blob emulator."""

from __future__ import annotations

import uuid

import fsspec
import pytest

from ckpt import CheckpointStore

CLOUD = [pytest.param("gcs", marks=[pytest.mark.integration, pytest.mark.gcs]),
         pytest.param("azure", marks=[pytest.mark.integration, pytest.mark.azure])]  # their emulators
BACKENDS = ["local", "memory", pytest.param("s3", marks=pytest.mark.s3), *CLOUD]
# Backends another process sees too (memory:// lives in one process).
SHARED_BACKENDS = ["local", pytest.param("s3", marks=pytest.mark.s3), *CLOUD]


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path):
    """A fresh, empty store root on one backend."""
    if request.param == "local":
        yield str(tmp_path / "store")
    elif request.param == "memory":
        root = f"/baton-{uuid.uuid4().hex}"
        yield f"memory://{root}"
        memory = fsspec.filesystem("memory")
        if memory.exists(root):
            memory.rm(root, recursive=True)
    elif request.param in ("gcs", "azure"):
        yield request.getfixturevalue(f"{request.param}_store") + "/root"
    else:
        yield request.getfixturevalue("s3_store") + "/root"


@pytest.fixture
def store(store_url) -> CheckpointStore:
    return CheckpointStore(store_url)
