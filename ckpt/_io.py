"""How bytes reach storage: fsspec filesystems, hashed writes, atomic commits.

Local disk gets real durability (fsync, atomic rename); object stores get single PUTs for the
small documents that must appear atomically, and multipart uploads for large files.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import re
import sys
import time
import uuid
from concurrent.futures import Future
from datetime import datetime, timezone
from typing import Any

import blake3
import fsspec
from fsspec.implementations.local import LocalFileSystem

from . import _cloud, _endpoint
from ._blob import CHUNK, HASH_THREADS, Blob, ChunkHasher, blake3_hex, chunked_sha256, hash_pool
from .manifest import FileEntry

_HASH_CHUNK = 64 * 2**20


def open_filesystem(url: str, storage_options: dict[str, Any] | None = None):
    """Return (fs, root, canonical_url) for a local path or an fsspec URL."""
    options = dict(storage_options or {})
    if "://" not in url:
        root = os.path.abspath(os.path.expanduser(url))
        return LocalFileSystem(auto_mkdir=True), root, root
    protocol = url.split("://", 1)[0]
    if protocol in _cloud.PROTOCOLS:  # gs://, az://: Baton's own gcsfs/adlfs classes, ckpt/_cloud.py
        return _cloud.open_filesystem(url, protocol, options)
    if protocol in ("s3", "s3a"):
        # Listings must never be stale after another process writes (a resumed run, a cleanup).
        options.setdefault("use_listings_cache", False)
        options.setdefault("skip_instance_cache", True)
        options["config_kwargs"] = _endpoint.s3_config(options)
        # botocore reads AWS_ENDPOINT_URL itself; s3fs passes it explicitly for older clients.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in options and "endpoint_url" not in options.get("client_kwargs", {}):
            options["endpoint_url"] = endpoint
    fs, path = fsspec.core.url_to_fs(url, **options)
    if isinstance(fs, LocalFileSystem):
        fs = LocalFileSystem(auto_mkdir=True)
        return fs, path, path
    root = path.rstrip("/")
    canonical = f"{protocol}://{root}"
    if protocol in ("s3", "s3a"):
        fs = _endpoint.UnreachableAsError(fs, canonical, _endpoint.endpoint_of(options))
    return fs, root, canonical


def is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def sha256_hex(data) -> str:
    digest = hashlib.sha256()
    view = memoryview(data).cast("B")
    for start in range(0, len(view), _HASH_CHUNK):
        digest.update(view[start : start + _HASH_CHUNK])
    return digest.hexdigest()


def _writeback_starter():
    """`sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)`: start writing a range to disk now,
    without waiting, so the disk works while the next chunks are copied and hashed (fsync at the
    end then has little left to do). None where libc has no such call."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd, offset, count: call(fd, offset, count, 2)  # 2 = SYNC_FILE_RANGE_WRITE


_start_writeback = _writeback_starter() if sys.platform.startswith("linux") else None


def write_file(fs, path: str, data) -> FileEntry:
    """Write one checkpoint file (not yet committed) and return its size and BLAKE3.

    `data` is bytes, a buffer or a Blob (written piece by piece, never joined on disk). The hash
    runs on a helper thread while the chunks are written (the writing thread mostly waits on the
    disk; BLAKE3 on one core is ~5x faster than this disk)."""
    blob = data if isinstance(data, Blob) else Blob([data])
    if not is_local(fs):
        payload = bytes(blob)  # what is uploaded is what is hashed
        digest = blake3_hex(payload)
        fs.pipe_file(path, payload)
        return _entry(blob, digest)
    # Always hashed here, even when the blob was hashed before: its memory may have changed since
    # (a Blob is a view of tensors), and the manifest must describe these bytes. Nothing changes
    # them while this call runs (a sync save holds the training thread; an async one, a snapshot).
    hashed = hash_pool().submit(_blake3_one_core, blob.parts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset = 0
        for parts in blob.chunks(CHUNK):
            start = offset
            for part in parts:
                written = 0
                while written < len(part):
                    written += os.write(fd, part[written:])
                offset += written
            if _start_writeback is not None:
                _start_writeback(fd, start, offset - start)
        os.fsync(fd)
    finally:
        os.close(fd)
    return _entry(blob, hashed.result())


def _blake3_one_core(parts: list[memoryview]) -> str:
    digest = blake3.blake3()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def _entry(blob: Blob, digest: str) -> FileEntry:
    blob.remember_hash(digest)
    return FileEntry(size=blob.size, blake3=digest)


def write_atomic(fs, path: str, data: bytes) -> None:
    """Make `data` visible at `path` all at once: rename on disk, one PUT on object stores."""
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    directory = os.path.dirname(path)
    tmp = _write_temp(directory, path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    # The rename itself must survive a power cut before the checkpoint counts as committed.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_temp(directory: str, path: str, data: bytes) -> str:
    """Write `data` durably to a temporary file next to `path` (named by `temp_name`).

    A failed write (disk full) removes its temporary file; one left by a killed process is
    removed by retention's leftover sweep once older than its ttl."""
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, temp_name(os.path.basename(path)))
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


_TEMP = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")


def temp_name(name: str) -> str:
    return f".{name}.{uuid.uuid4().hex}.tmp"


def is_temp_name(name: str) -> bool:
    """True for the name of a temporary file of `write_atomic` / `write_exclusive`."""
    return _TEMP.fullmatch(name) is not None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_exclusive(fs, path: str, data: bytes) -> bool:
    """Create `path` only if absent (O_EXCL on disk, If-None-Match on S3). False if it existed."""
    if is_local(fs):
        # Written aside, then hard-linked into place: a reader never sees the file half-written.
        tmp = _write_temp(os.path.dirname(path), path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            _unlink_quietly(tmp)
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


def read_hashed(fs, path: str, entry: FileEntry) -> tuple[memoryview, str]:
    """Read a whole file into one writable buffer and hash it the way `entry` was hashed, each
    chunk on a helper thread while the next one is read.

    The buffer is a private anonymous memory map: unlike a bytearray it is not zero-filled first,
    which alone cost a third of the read time. Measured on 2 cores (BENCHMARKS.md): BLAKE3 while
    reading keeps up with a plain `read()`; the chunked sha256 of schema 2 holds it to ~0.7."""
    if not is_local(fs):
        data = memoryview(bytearray(fs.cat_file(path)))
        return data, _hash_buffer(data, entry)
    with open(path, "rb", buffering=0) as handle:
        size = os.fstat(handle.fileno()).st_size
        _prefetch(handle.fileno(), size)
        view = memoryview(_private_buffer(size) if size else bytearray())
        if entry.kind == "blake3":
            hasher: ChunkHasher | _Blake3Stream | None = _Blake3Stream()
        else:  # schema 2: the chunks' sha256s; schema 1: the whole file's, after reading
            hasher = ChunkHasher(entry.chunk_size) if entry.chunk_size else None
        done = 0
        while done < size:
            end = min(size, done + (entry.chunk_size or CHUNK))
            count = _read_into(handle, view[done:end])
            if hasher is not None:
                hasher.add([view[done : done + count]])
            done += count
            if done < end:  # the file shrank while being read
                break
        if isinstance(hasher, ChunkHasher) and size == 0:
            hasher.add([])
    return view[:done], (hasher.hexdigest() if hasher is not None else sha256_hex(view[:done]))


def _private_buffer(size: int) -> mmap.mmap:
    """Fresh writable memory that is not zero-filled: a private anonymous mapping. (Python's default
    for `mmap.mmap(-1, n)` is a *shared* one, backed by shmem, whose pages cost a third more to
    fill: reading into it ran at 0.69 of `read()`; into a private one, at 1.0.)"""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _hash_buffer(data, entry: FileEntry) -> str:
    if entry.kind == "blake3":
        return blake3_hex(data)
    return sha256_hex(data) if entry.chunk_size is None else chunked_sha256(data, entry.chunk_size)


def hash_file(fs, path: str, entry: FileEntry) -> tuple[int, str]:
    """Size and hash (of `entry`'s kind) of a file, read in chunks into a few reused buffers."""
    if not is_local(fs) or entry.kind == "sha256":
        data, digest = read_hashed(fs, path, entry)
        return len(data), digest
    chunk_size = entry.chunk_size or CHUNK
    hasher = ChunkHasher(chunk_size) if entry.chunk_size else _Blake3Stream()
    buffers = [bytearray(chunk_size) for _ in range(HASH_THREADS + 1)]
    pending: list = [None] * len(buffers)
    size, index = 0, 0
    with open(path, "rb", buffering=0) as handle:
        _prefetch(handle.fileno(), os.fstat(handle.fileno()).st_size)
        while True:
            slot = index % len(buffers)
            if pending[slot] is not None:
                pending[slot].result()  # that buffer's previous chunk is hashed: reuse it
            view = memoryview(buffers[slot])
            count = _read_into(handle, view)
            if count == 0 and size > 0:
                break
            pending[slot] = hasher.add([view[:count]])
            size += count
            index += 1
            if count < chunk_size:
                break
    return size, hasher.hexdigest()


class _Blake3Stream:
    """BLAKE3 of a stream fed chunk by chunk, hashed in order on one helper thread while the
    next chunk is read."""

    def __init__(self) -> None:
        self._digest = blake3.blake3()
        self._last: Future | None = None

    def add(self, parts: list[memoryview]) -> Future:
        previous = self._last

        def update() -> None:
            if previous is not None:
                previous.result()
            for part in parts:
                self._digest.update(part)

        self._last = hash_pool().submit(update)
        return self._last

    def hexdigest(self) -> str:
        if self._last is not None:
            self._last.result()
        return self._digest.hexdigest()


def _prefetch(fd: int, size: int) -> None:
    """Ask the kernel to read the whole file ahead now: the disk then streams at full speed while
    this process copies and hashes what has arrived."""
    if size and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_SEQUENTIAL)
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)


def _read_into(handle, view: memoryview) -> int:
    """Fill `view` from the file (fewer bytes only at its end)."""
    done = 0
    while done < len(view):
        count = handle.readinto(view[done:])
        if not count:
            break
        done += count
    return done


def read_bytes(fs, path: str) -> bytes:
    if is_local(fs):
        with open(path, "rb") as handle:
            return handle.read()
    return fs.cat_file(path)


def remove_local_tree(folder: str, last: str | None = None) -> int:
    """Remove a local folder and everything in it, the file named `last` last; bytes freed.

    Several cleanups may remove the same folder at once: whatever is already gone counts as
    removed, never as an error (only what this call unlinked counts as freed)."""
    freed = 0
    for _ in range(3):  # another deleter may drop a file in (its deletion marker) while we empty it
        freed += _empty_local_folder(folder, last)
        try:
            os.rmdir(folder)
            return freed
        except FileNotFoundError:
            return freed
        except OSError as err:
            if err.errno != errno.ENOTEMPTY:
                raise
    return freed  # still refilled: left for the next cleanup, which sees it as a leftover


def _empty_local_folder(folder: str, last: str | None) -> int:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name == last)
    except FileNotFoundError:
        return 0
    freed = 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                freed += remove_local_tree(entry.path, last)
            else:
                size = entry.stat(follow_symlinks=False).st_size
                os.unlink(entry.path)
                freed += size
        except FileNotFoundError:
            continue
    return freed


def remove_remote_files(fs, folder: str, last: str | None = None) -> int:
    """Remove every object under `folder` on an object store, the one named `last` last."""
    try:
        files = fs.find(folder, detail=True)
    except FileNotFoundError:
        return 0
    freed = 0
    for path in sorted(files, key=lambda p: p.rsplit("/", 1)[-1] == last):
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            continue
        freed += int(files[path].get("size") or 0)
    return freed


def mtime(info: dict) -> float:
    """Modification time of an fsspec listing entry, whatever the backend calls it."""
    value = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    if isinstance(value, datetime):
        return value.replace(tzinfo=value.tzinfo or timezone.utc).timestamp()
    if value is None:
        return time.time()
    return float(value)
