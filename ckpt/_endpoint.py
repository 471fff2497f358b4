"""S3 stores answer quickly when their server cannot be reached.

botocore's defaults (and the 10 adaptive attempts Baton used to set) retry a refused or timed-out
connection for over a minute per call, and a store makes several calls before it reports anything:
a `baton` command on a store whose server is down sat silent for almost three minutes. A dead
endpoint is a setup mistake, to be told at once; throttling and 5xx answers still get retried (by
botocore, and again by s3fs for `SlowDown` and timeouts)."""

from __future__ import annotations

import functools
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


def endpoint_of(options: dict[str, Any]) -> str | None:
    return options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")


class UnreachableAsError:
    """The filesystem, whose calls raise `StoreUnreachable` naming the endpoint and the fix instead
    of botocore's bare connection errors. Everything else passes through unchanged."""

    def __init__(self, fs: Any, url: str, endpoint: str | None):
        self._fs, self._url, self._endpoint = fs, url, endpoint

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_fs", "_url", "_endpoint"):
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
                    raise StoreUnreachable(_message(self._url, self._endpoint, err)) from err
                raise
        return call

    def __repr__(self) -> str:
        return repr(self._fs)


def _is_connection_error(err: BaseException) -> bool:
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
    except ImportError:  # no botocore: no S3 store either
        return False
    return isinstance(err, BotoConnectionError)


def _message(url: str, endpoint: str | None, err: BaseException) -> str:
    where = endpoint or getattr(err, "kwargs", {}).get("endpoint_url") or "the default AWS S3 endpoint"
    return (
        f"cannot reach the S3 endpoint {where} of store {url} ({err.__class__.__name__}: {err}). "
        f"To resolve this: 1. start the S3 server or check the network; 2. check `endpoint_url` (in "
        f"storage_options, or AWS_ENDPOINT_URL); 3. to wait longer for a slow server, set storage_options "
        f'{{"config_kwargs": {{"connect_timeout": S, "retries": {{"total_max_attempts": N}}}}}} '
        f"(Baton's defaults: {CONNECT_TIMEOUT_S} s and {RETRIES['total_max_attempts']} attempts)")
