"""An S3 store whose server cannot be reached says so within seconds, naming the endpoint and the
fix, instead of retrying for minutes. No S3 server needed: the endpoint is a closed local port."""

from __future__ import annotations

import pickle
import socket
import time

import pytest

from ckpt import CheckpointError, CheckpointStore, StoreUnreachable

CREDENTIALS = {"key": "baton-test", "secret": "baton-test"}  # no lookup of real credentials


@pytest.fixture
def closed_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the socket is closed


@pytest.mark.slow
def test_a_store_on_an_unreachable_endpoint_fails_within_seconds_naming_the_endpoint_and_the_fix(closed_endpoint):
    store = CheckpointStore("s3://bucket/root", {"endpoint_url": closed_endpoint, **CREDENTIALS})
    started = time.monotonic()
    with pytest.raises(StoreUnreachable) as err:
        store.lineages()
    assert time.monotonic() - started < 20
    message = str(err.value)
    assert closed_endpoint in message and "s3://bucket/root" in message
    assert "endpoint_url" in message and "connect_timeout" in message and "AWS_ENDPOINT_URL" in message
    assert isinstance(err.value, CheckpointError)
    assert str(pickle.loads(pickle.dumps(err.value))) == message


@pytest.mark.slow
def test_the_endpoint_set_in_the_environment_is_the_one_named(closed_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed_endpoint)
    store = CheckpointStore("s3://bucket/root", dict(CREDENTIALS))
    with pytest.raises(StoreUnreachable, match=closed_endpoint.replace(".", r"\.")):
        store.latest("run")


def test_the_users_botocore_settings_win_over_batons_defaults(closed_endpoint):
    mine = {"retries": {"total_max_attempts": 1, "mode": "standard"}, "read_timeout": 7}
    store = CheckpointStore("s3://bucket/root", {"endpoint_url": closed_endpoint, "config_kwargs": mine,
                                                 **CREDENTIALS})
    config = store.fs.config_kwargs
    assert config["retries"] == mine["retries"] and config["read_timeout"] == 7
    assert config["connect_timeout"] == 3  # Baton's default where the user set none
    started = time.monotonic()
    with pytest.raises(StoreUnreachable):
        store.lineages()
    assert time.monotonic() - started < 5  # one attempt, no backoff
    overridden = CheckpointStore("s3://bucket/root", {"config_kwargs": {"connect_timeout": 30}, **CREDENTIALS})
    assert overridden.fs.config_kwargs["connect_timeout"] == 30


def test_a_reachable_store_is_not_wrapped_on_local_disk(tmp_path):
    store = CheckpointStore(str(tmp_path))
    assert type(store.fs).__name__ == "LocalFileSystem"


def test_an_s3_store_survives_pickling_and_still_names_an_unreachable_endpoint(closed_endpoint):
    store = CheckpointStore("s3://bucket/root", {"endpoint_url": closed_endpoint, **CREDENTIALS,
                                                 "config_kwargs": {"retries": {"total_max_attempts": 1}}})
    again = pickle.loads(pickle.dumps(store))
    with pytest.raises(StoreUnreachable, match="127.0.0.1"):
        again.lineages()
