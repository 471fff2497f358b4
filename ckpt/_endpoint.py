"""Object stores answer quickly when their server cannot be reached (S3 here; GCS and Azure Blob set
their retry policies in ckpt/_gcs.py and ckpt/_azure.py, and are wrapped the same way).

botocore's defaults (and the 10 adaptive attempts Baton used to set) retry a refused or timed-out
connection for over a minute per call, and a store makes several calls before it reports anything:
a `baton` command on a store whose server is down sat silent for almost three minutes. A dead
endpoint is a setup mistake, to be told at once; throttling and 5xx answers still get retried (by
botocore, and again by s3fs for `SlowDown` and timeouts)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from .errors import StoreUnreachable

# Per call, refused: 4 attempts, jittered backoffs of at most 1 + 2 + 4 s; silently dropped: 4 x 3 s
# more. (botocore's `max_attempts` counts retries, `total_max_attempts` the first try too.)
CONNECT_TIMEOUT_S = 3
RETRIES = {"total_max_attempts": 4, "mode": "adaptive"}


def s3_config(options: dict[str, Any]) -> dict[str, Any]:
    """botocore `config_kwargs` with Baton's timeouts under whatever the user set (theirs win)."""
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    config.setdefault("retries", dict(RETRIES))
    return config


@dataclass(frozen=True)
class Service:
    """How `StoreUnreachable` names a service: its name, where it goes when no endpoint is set, and
    the settings that fix a wrong or slow one."""
    name: str
    default_endpoint: str
    fixes: str


S3 = Service("S3", "the default AWS S3 endpoint",
             "2. check `endpoint_url` (in storage_options, or AWS_ENDPOINT_URL); 3. to wait longer for a slow "
             'server, set storage_options {"config_kwargs": {"connect_timeout": S, "retries": '
             '{"total_max_attempts": N}}} '
             f"(Baton's defaults: {CONNECT_TIMEOUT_S} s and {RETRIES['total_max_attempts']} attempts)")
GCS = Service("Google Cloud Storage", "https://storage.googleapis.com",
              "2. check STORAGE_EMULATOR_HOST (an emulator) or `endpoint_url` in storage_options; 3. check "
              f"the network to Google (Baton waits {CONNECT_TIMEOUT_S} s for a connection, 4 attempts)")
AZURE = Service("Azure Blob", "https://ACCOUNT.blob.core.windows.net",
                "2. check the account and endpoint in AZURE_STORAGE_CONNECTION_STRING (BlobEndpoint=) or "
                "AZURE_STORAGE_ACCOUNT_NAME, or `account_host` in storage_options; 3. check the network "
                f"(Baton waits {CONNECT_TIMEOUT_S} s for a connection, 4 attempts)")


def endpoint_of(options: dict[str, Any]) -> str | None:
    return options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")


class UnreachableAsError:
    """The filesystem, whose calls raise `StoreUnreachable` naming the endpoint and the fix instead
    of botocore's bare connection errors. Everything else passes through unchanged."""

    def __init__(self, fs: Any, url: str, endpoint: str | None, service: Service = S3):
        self._fs, self._url, self._endpoint, self._service = fs, url, endpoint, service

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_fs", "_url", "_endpoint", "_service"):
            # Not yet set while unpickling: looking it up on `_fs` would recurse.
            raise AttributeError(name)
        value = getattr(self._fs, name)
        if not callable(value):
            return value

        @functools.wraps(value)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return value(*args, **kwargs)
            except Exception as err:
                if _is_connection_error(err):
                    raise StoreUnreachable(_message(self._url, self._endpoint, err, self._service)) from err
                raise
        return call

    def __repr__(self) -> str:
        return repr(self._fs)


def _is_connection_error(err: BaseException) -> bool:
    return isinstance(err, _connection_errors())


@functools.cache
def _connection_errors() -> tuple[type[BaseException], ...]:
    """What each client raises when it cannot connect at all (refused, no route, connect timeout):
    botocore's for S3, aiohttp's for gcsfs, azure-core's ServiceRequestError for adlfs. Each import
    is optional: without that client there is no such store either."""
    found: list[type[BaseException]] = []
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        found.append(BotoConnectionError)
    except ImportError:
        pass
    try:
        import aiohttp
        found += [aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError]
    except (ImportError, AttributeError):
        pass
    try:
        from azure.core.exceptions import ServiceRequestError
        found.append(ServiceRequestError)
    except ImportError:
        pass
    return tuple(found)


def _message(url: str, endpoint: str | None, err: BaseException, service: Service = S3) -> str:
    where = endpoint or getattr(err, "kwargs", {}).get("endpoint_url") or service.default_endpoint
    return (
        f"cannot reach the {service.name} endpoint {where} of store {url} ({err.__class__.__name__}: {err}). "
        f"To resolve this: 1. start the {service.name} server or check the network; {service.fixes}")
