"""How bytes reach storage: fsspec filesystems, hashed writes, atomic commits.

Local disk gets real durability (fsync, atomic rename); object stores get single PUTs for the
small documents that must appear atomically, and multipart uploads for large files.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .manifest import FileEntry

_HASH_CHUNK = 64 * 2**20


def open_filesystem(url: str, storage_options: dict[str, Any] | None = None):
    """Return (fs, root, canonical_url) for a local path or an fsspec URL."""
    options = dict(storage_options or {})
    if "://" not in url:
        root = os.path.abspath(os.path.expanduser(url))
        return LocalFileSystem(auto_mkdir=True), root, root
    protocol = url.split("://", 1)[0]
    if protocol in ("s3", "s3a"):
        # Listings must never be stale after another process writes (a resumed run, a cleanup).
        options.setdefault("use_listings_cache", False)
        options.setdefault("skip_instance_cache", True)
        config = dict(options.pop("config_kwargs", {}) or {})
        config.setdefault("retries", {"max_attempts": 10, "mode": "adaptive"})
        options["config_kwargs"] = config
        # botocore reads AWS_ENDPOINT_URL itself; s3fs passes it explicitly for older clients.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in options and "endpoint_url" not in options.get("client_kwargs", {}):
            options["endpoint_url"] = endpoint
    fs, path = fsspec.core.url_to_fs(url, **options)
    if isinstance(fs, LocalFileSystem):
        fs = LocalFileSystem(auto_mkdir=True)
        return fs, path, path
    root = path.rstrip("/")
    return fs, root, f"{protocol}://{root}"


def is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def sha256_hex(data) -> str:
    digest = hashlib.sha256()
    view = memoryview(data).cast("B")
    for start in range(0, len(view), _HASH_CHUNK):
        digest.update(view[start : start + _HASH_CHUNK])
    return digest.hexdigest()


def _hash_beside(data) -> tuple[threading.Thread, list[str]]:
    """Hash on a second thread: hashlib releases the GIL, so it overlaps the write."""
    out: list[str] = []
    thread = threading.Thread(target=lambda: out.append(sha256_hex(data)), daemon=True)
    thread.start()
    return thread, out


def write_file(fs, path: str, data) -> FileEntry:
    """Write one checkpoint file (not yet committed) and return its size and sha256."""
    view = memoryview(data).cast("B")
    thread, digest = _hash_beside(view)
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            written = 0
            while written < len(view):
                written += os.write(fd, view[written : written + _HASH_CHUNK])
            os.fsync(fd)
        finally:
            os.close(fd)
    else:
        fs.pipe_file(path, bytes(view) if not isinstance(data, bytes) else data)
    thread.join()
    return FileEntry(size=len(view), sha256=digest[0])


def write_atomic(fs, path: str, data: bytes) -> None:
    """Make `data` visible at `path` all at once: rename on disk, one PUT on object stores."""
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    # The rename itself must survive a power cut before the checkpoint counts as committed.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_exclusive(fs, path: str, data: bytes) -> bool:
    """Create `path` only if absent (O_EXCL on disk, If-None-Match on S3). False if it existed."""
    if is_local(fs):
        # Written aside, then hard-linked into place: a reader never sees the file half-written.
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    if fs.exists(path):
        return False
    try:
        fs.pipe_file(path, data, mode="create")
    except (FileExistsError, OSError):
        # RGW's 412 Precondition Failed reaches s3fs as OSError(EINVAL), not FileExistsError.
        if fs.exists(path):
            return False
        raise
    return True


def read_hashed(fs, path: str) -> tuple[bytes, str]:
    """Read a file and its sha256; on disk the hash of each chunk overlaps the read of the next."""
    if not is_local(fs):
        data = fs.cat_file(path)
        return data, sha256_hex(data)
    digest, chunks = hashlib.sha256(), queue.Queue()

    def consume() -> None:
        while (chunk := chunks.get()) is not None:
            digest.update(chunk)

    hasher = threading.Thread(target=consume, daemon=True)
    with open(path, "rb", buffering=0) as handle:
        size = os.fstat(handle.fileno()).st_size
        buffer = bytearray(size)
        view, done = memoryview(buffer), 0
        hasher.start()
        try:
            while done < size:
                count = handle.readinto(view[done:done + _HASH_CHUNK])
                if not count:
                    break
                chunks.put(view[done:done + count])
                done += count
        finally:
            chunks.put(None)
            hasher.join()
    return bytes(view[:done]), digest.hexdigest()


def read_bytes(fs, path: str) -> bytes:
    if is_local(fs):
        with open(path, "rb") as handle:
            return handle.read()
    return fs.cat_file(path)
