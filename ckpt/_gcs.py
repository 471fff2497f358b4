"""Google Cloud Storage stores (`gs://bucket/prefix`): the gcsfs filesystem Baton opens, with its own
retry and timeout policy and an explicit refusal of the one exclusive create it cannot vouch for.

Why not `fsspec.filesystem("gs")`:
- gcsfs (2026.10) registers `ExtendedGcsFileSystem` for `gs://`, which first asks the gRPC
  storage-control API what kind of bucket it is. Against an emulator (or any endpoint without that
  API) that question waits out a 60 s deadline before falling back to the JSON API. Baton needs only
  object PUT, GET, list and delete, which the JSON API's `GCSFileSystem` does on every bucket but a
  zonal (Rapid) one.
- gcsfs retries a refused connection 6 times with backoffs of up to 1 + 2 + 4 + 8 + 16 s (its
  `retries` is bound when the class is defined): a store whose endpoint is down sat silent for over
  half a minute before saying anything. Baton makes it 4 attempts (backoffs of 1-2, 2-3, 4-5 s, the
  same count as its S3 policy), for throttling (429) and 5xx answers too, and gives up on a
  connection after 3 s.

The promises rest on GCS's own primitives: an upload under 50 MiB is one request (the object
appears whole or not at all: the manifest, the lease record); an exclusive create is an upload with
`ifGenerationMatch=0` (the lease's claims, `mark_once`), answered 412 when the object exists; larger
files go up as resumable uploads, visible only once finalized.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import aiohttp
from gcsfs.core import GCSFileSystem
from gcsfs.retry import retry_request

from ._endpoint import CONNECT_TIMEOUT_S
from .errors import InvalidArgument

ATTEMPTS = 4
# gcsfs uploads anything smaller than this in one request; larger, as a resumable upload.
SIMPLE_UPLOAD_MAX = 50 * 2**20
READ_TIMEOUT_S = 120  # a server that stops answering mid-request: fail, and let the retries try again
DEFAULT_ENDPOINT = "https://storage.googleapis.com"
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"

if not hasattr(GCSFileSystem._request, "__wrapped__"):  # pragma: no cover - a gcsfs that changed shape
    raise ImportError("gcsfs.core.GCSFileSystem._request is no longer a retry_request-decorated function: "
                      "Baton cannot set its retry policy; pin gcsfs to a version Baton was tested with (2026.10)")


class _NoTracebackForConnectionFailures(logging.Filter):
    """gcsfs logs a full traceback when it gives up on a connection; Baton then raises
    `StoreUnreachable`, which says the same in one line and names the fix."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))


logging.getLogger("gcsfs").addFilter(_NoTracebackForConnectionFailures())


class BatonGCSFileSystem(GCSFileSystem):
    """gcsfs's JSON-API filesystem with Baton's retries and timeouts (see the module docstring)."""

    retries = ATTEMPTS
    _request = retry_request(retries=ATTEMPTS)(GCSFileSystem._request.__wrapped__)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Set here, not in the URL's options: pickling (a store sent to Ray workers) replays only the
        # options the caller gave, and this class sets its defaults again.
        kwargs.setdefault("requests_timeout", aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S))
        super().__init__(*args, **kwargs)

    async def _pipe_file(self, path, data, *args: Any, mode: str = "overwrite",
                         chunksize: int = SIMPLE_UPLOAD_MAX, **kwargs: Any):
        if mode == "create" and len(data) >= chunksize:
            # Real GCS checks ifGenerationMatch=0 when a resumable upload is finalized, but
            # fake-gcs-server (what Baton is tested against) ignores it there: 8 of 8 contenders
            # "won". Untested exclusivity is refused rather than trusted; Baton's own exclusive
            # creates (lease claims, markers) are a few hundred bytes.
            raise InvalidArgument(
                f"refusing an exclusive create of {len(data)} bytes at gs://{path}: on GCS Baton creates "
                f"exclusively only in one request (under {SIMPLE_UPLOAD_MAX} bytes), the way it is tested")
        return await super()._pipe_file(path, data, *args, mode=mode, chunksize=chunksize, **kwargs)


def gcs_options(options: dict[str, Any]) -> dict[str, Any]:
    """gcsfs arguments: Baton's defaults under the user's storage_options (theirs win)."""
    options = dict(options)
    # Listings must never be stale after another process writes (a resumed run, a cleanup).
    options.setdefault("use_listings_cache", False)
    options.setdefault("skip_instance_cache", True)
    if os.environ.get(EMULATOR_ENV) and "token" not in options:
        # An emulator takes no credentials; without this, gcsfs first looks for Google's default
        # credentials, which on a machine outside Google Cloud means asking a metadata server.
        options["token"] = "anon"
    return options


def endpoint(options: dict[str, Any]) -> str:
    """The endpoint a GCS store talks to, as gcsfs resolves it."""
    where = options.get("endpoint_url") or os.environ.get(EMULATOR_ENV) or DEFAULT_ENDPOINT
    return where if "://" in where else f"http://{where}"
