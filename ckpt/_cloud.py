"""Google Cloud Storage and Azure Blob stores: which filesystem Baton opens for their URLs.

Their clients (gcsfs, adlfs) are imported only when such a store is opened: each costs a second or
more to import, which a local or S3 run should not pay."""

from __future__ import annotations

from typing import Any

from . import _endpoint

GCS_PROTOCOLS = ("gs", "gcs")
AZURE_PROTOCOLS = ("az", "abfs", "abfss")
PROTOCOLS = GCS_PROTOCOLS + AZURE_PROTOCOLS


def open_filesystem(url: str, protocol: str, options: dict[str, Any]):
    """(fs, root, canonical_url) for a `gs://` or `az://` URL; the fs raises `StoreUnreachable`
    naming the endpoint when it cannot connect."""
    if protocol in GCS_PROTOCOLS:
        from . import _gcs

        options = _gcs.gcs_options(options)
        fs: Any = _gcs.BatonGCSFileSystem(**options)
        where, service = _gcs.endpoint(options), _endpoint.GCS
    else:
        from . import _azure

        options = {**_azure.BatonAzureBlobFileSystem._get_kwargs_from_urls(url), **_azure.azure_options(options)}
        fs = _azure.BatonAzureBlobFileSystem(**options)
        where, service = _azure.endpoint(fs), _endpoint.AZURE
    root = fs._strip_protocol(url).rstrip("/")
    canonical = f"{protocol}://{root}"
    return _endpoint.UnreachableAsError(fs, canonical, where, service), root, canonical
