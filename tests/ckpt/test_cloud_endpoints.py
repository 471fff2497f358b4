"""GCS and Azure Blob stores whose endpoint cannot be reached say so within seconds, naming the
endpoint and the fix (never a credential), and refuse what they could not do safely. No server
needed: the endpoint is a closed local port. Slow tier: the retries' backoffs must run out."""

from __future__ import annotations

import pickle
import socket
import time

import pytest

from ckpt import CheckpointStore, InvalidArgument, StoreUnreachable
from ckpt import _io

pytestmark = pytest.mark.slow

AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


def _unreachable_within_15_s(store: CheckpointStore) -> str:
    started = time.monotonic()
    with pytest.raises(StoreUnreachable) as err:
        store.lineages()
    assert time.monotonic() - started < 15
    return str(err.value)


def test_a_gcs_store_on_an_unreachable_endpoint_fails_within_15_s_naming_it_and_the_fix(
        closed_port, monkeypatch, caplog):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{closed_port}")
    store = pickle.loads(pickle.dumps(CheckpointStore("gs://bucket/root")))  # as a Ray worker gets it
    message = _unreachable_within_15_s(store)
    assert f"http://127.0.0.1:{closed_port}" in message and "gs://bucket/root" in message
    assert "Google Cloud Storage" in message and "STORAGE_EMULATOR_HOST" in message
    # ... in that one line: gcsfs's own traceback of giving up is not logged as well
    assert not [r for r in caplog.records if r.name.startswith("gcsfs") and r.exc_info]


def test_an_azure_store_on_an_unreachable_endpoint_fails_within_15_s_naming_it_but_not_its_key(
        closed_port, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", (
        f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{closed_port}/devstoreaccount1;"))
    store = pickle.loads(pickle.dumps(CheckpointStore("az://container/root")))
    message = _unreachable_within_15_s(store)
    assert f"127.0.0.1:{closed_port}" in message and "az://container/root" in message
    assert "AZURE_STORAGE_CONNECTION_STRING" in message
    assert AZURITE_KEY not in message and AZURITE_KEY[:16] not in message


def test_a_gcs_exclusive_create_too_large_for_one_request_is_refused_before_anything_is_sent(
        closed_port, monkeypatch):
    # fake-gcs-server ignores ifGenerationMatch=0 on resumable uploads: such a create is untested.
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{closed_port}")
    store = CheckpointStore("gs://bucket/root")
    started = time.monotonic()
    with pytest.raises(InvalidArgument, match="exclusive create"):
        store.fs.pipe_file("bucket/root/big", b"\0" * (50 * 2**20), mode="create")
    assert time.monotonic() - started < 2  # refused, not retried against the closed port
    with pytest.raises(StoreUnreachable):  # a small one is sent (and finds nobody there)
        _io.write_exclusive(store.fs, "bucket/root/small", b"claim")
