"""Azure Blob stores (`az://container/prefix`, also `abfs://`, `abfss://`): the adlfs filesystem Baton
opens, with its own retry and timeout policy.

adlfs builds its `BlobServiceClient` with the Azure SDK's default retry policy: 3 retries after
backoffs of 15, 18 and 24 s (and a 20 s connection timeout), so a store whose endpoint is down said
nothing for over a minute. Baton's client retries 3 times after backoffs of 1-2, 2-3 and 4-5 s, as
gcsfs does (for throttling and 5xx answers too: the SDK's `ExponentialRetry` decides what to retry),
and gives up on a connection after 3 s.

The promises rest on Azure's own primitives: a blob under 64 MiB is one Put Blob (the blob appears
whole or not at all: the manifest, the lease record); an exclusive create (`overwrite=False`) sends
`If-None-Match: *`, answered 409 when the blob exists, also on the Put Block List that commits a
larger blob staged in blocks (which stays invisible until then).

Credentials come from the standard variables adlfs reads: AZURE_STORAGE_CONNECTION_STRING, or
AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_TOKEN, or a service
principal (AZURE_STORAGE_CLIENT_ID/_SECRET/TENANT_ID), else DefaultAzureCredential.
"""

from __future__ import annotations

import random
from typing import Any

from adlfs import AzureBlobFileSystem
from azure.storage.blob.aio import BlobServiceClient, ExponentialRetry

from ._endpoint import CONNECT_TIMEOUT_S
from .errors import InvalidArgument

RETRIES = 3  # after the first attempt: 4 in all, as for S3 and GCS
READ_TIMEOUT_S = 120


class _Backoff(ExponentialRetry):
    """The SDK's retry decisions with shorter waits: its own formula (initial + base ** count)
    gave 3, 5 and 9 s at best, 17 s before a dead endpoint was reported."""

    def get_backoff_time(self, settings: dict[str, Any]) -> float:
        return random.random() + 2 ** max(settings["count"] - 1, 0)


class BatonAzureBlobFileSystem(AzureBlobFileSystem):
    """adlfs's filesystem whose service client has Baton's retries and timeouts."""

    def do_connect(self) -> None:
        client_kwargs = {
            "retry_policy": _Backoff(retry_total=RETRIES),
            "connection_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
        }
        # The order of adlfs's own do_connect: a connection string, else an account with a
        # credential (an identity, then a key), a SAS token, or nothing (a public container).
        if self.connection_string is not None:
            self.service_client = BlobServiceClient.from_connection_string(self.connection_string, **client_kwargs)
            return
        if self.account_name is None:
            raise InvalidArgument(
                "an Azure Blob store needs an account: set AZURE_STORAGE_CONNECTION_STRING, or "
                "AZURE_STORAGE_ACCOUNT_NAME with a key (AZURE_STORAGE_ACCOUNT_KEY), a SAS token "
                "(AZURE_STORAGE_SAS_TOKEN) or an identity, or pass them in storage_options")
        host = getattr(self, "account_host", None) or f"{self.account_name}.blob.core.windows.net"
        url = f"https://{host}"
        credential = self.credential if self.credential is not None else self.account_key
        if credential is None and self.sas_token is not None:
            url += self.sas_token if self.sas_token.startswith("?") else f"?{self.sas_token}"
        if self.location_mode is not None:
            client_kwargs["_location_mode"] = self.location_mode
        self.service_client = BlobServiceClient(account_url=url, credential=credential, **client_kwargs)


def azure_options(options: dict[str, Any]) -> dict[str, Any]:
    """adlfs arguments: Baton's defaults under the user's storage_options (theirs win)."""
    options = dict(options)
    # Listings must never be stale after another process writes (a resumed run, a cleanup).
    options.setdefault("use_listings_cache", False)
    options.setdefault("skip_instance_cache", True)
    return options


def endpoint(fs: Any) -> str:
    """The blob endpoint a store talks to, without any SAS token or key."""
    client = fs.service_client
    return f"{client.scheme}://{client.primary_hostname}"
