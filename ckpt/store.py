"""CheckpointStore: committed checkpoints of many lineages under one fsspec root.

Layout::

    <root>/<lineage>/<checkpoint-id>/<files...>
    <root>/<lineage>/<checkpoint-id>/manifest.json   # written last: the commit
    <root>/<lineage>/_aliases/<alias>.json           # pins, one object per alias
    <root>/<lineage>/_lease/...                      # the single-writer lease
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timezone
from typing import Any, Callable, Literal

from pydantic import ValidationError

from . import _io
from .errors import CheckpointCorrupted, CheckpointError, CheckpointExists, CheckpointNotFound
from .manifest import MANIFEST_NAME, CheckpointRef, FileEntry, Manifest, Position
from .names import checkpoint_id, validate_checkpoint_id, validate_name

log = logging.getLogger("baton.ckpt")

Mode = Literal["min", "max"]
DELETING_MARKER = "deleting.marker"


def _encode_manifest(manifest: Manifest) -> bytes:
    body = manifest.model_dump(mode="json")
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    envelope = {"manifest": body, "sha256": _io.sha256_hex(canonical)}
    return json.dumps(envelope, sort_keys=True, indent=1).encode()


def _decode_manifest(raw: bytes, where: str) -> Manifest:
    """Parse and self-check a manifest; a flipped byte anywhere in it is an error."""
    try:
        envelope = json.loads(raw)
        body = envelope["manifest"]
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        if _io.sha256_hex(canonical) != envelope["sha256"]:
            raise ValueError("its own sha256 does not match its content")
        return Manifest.model_validate(body)
    except (ValueError, KeyError, TypeError, ValidationError) as err:
        raise ValueError(f"{where}: unreadable manifest ({err.__class__.__name__}: {err})") from err


class CheckpointStore:
    """Checkpoints of every lineage under one root: a local folder or any fsspec URL."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.fs, self.root, self.url = _io.open_filesystem(url, storage_options)
        self.storage_options = dict(storage_options or {})

    def __repr__(self) -> str:
        return f"CheckpointStore({self.url!r})"

    # ---- paths -----------------------------------------------------------------------------
    def path(self, lineage: str, *parts: str) -> str:
        return "/".join([self.root, validate_name(lineage), *parts])

    def uri(self, lineage: str, ckpt_id: str | None = None) -> str:
        parts = [self.url.rstrip("/"), lineage] + ([ckpt_id] if ckpt_id else [])
        return "/".join(parts)

    @property
    def is_local(self) -> bool:
        return _io.is_local(self.fs)

    # ---- queries ---------------------------------------------------------------------------
    def lineages(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        names = []
        for entry in self.fs.ls(self.root, detail=True):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry["type"] == "directory" and not name.startswith((".", "_")):
                names.append(name)
        return sorted(names)

    def _manifest_paths(self, lineage: str) -> list[str]:
        return sorted(self.fs.glob(self.path(lineage, "*", MANIFEST_NAME)))

    def list(self, lineage: str) -> list[Manifest]:
        """Committed checkpoints of `lineage`, oldest first. Unreadable manifests are skipped."""
        manifests, _ = self._read_manifests(lineage)
        return manifests

    def _read_manifests(self, lineage: str) -> tuple[list[Manifest], list[str]]:
        paths = self._manifest_paths(lineage)
        if not paths:
            return [], []
        # A manifest may vanish between the listing and the read (a concurrent delete): it is
        # then no longer committed, and simply not listed.
        blobs = self._read_existing(paths)
        manifests, problems = [], []
        for path in paths:
            if path not in blobs:
                continue
            try:
                manifests.append(_decode_manifest(blobs[path], path))
            except ValueError as err:
                problems.append(str(err))
                log.warning("skipping checkpoint: %s", err)
        manifests.sort(key=lambda m: m.id)
        return manifests, problems

    def _read_existing(self, paths: list[str]) -> dict[str, bytes]:
        if not self.is_local:
            return self.fs.cat(paths, on_error="omit")
        blobs = {}
        for path in paths:
            try:
                blobs[path] = _io.read_bytes(self.fs, path)
            except FileNotFoundError:
                pass
        return blobs

    def manifest(self, lineage: str, ckpt_id: str) -> Manifest:
        path = self.path(lineage, validate_checkpoint_id(ckpt_id), MANIFEST_NAME)
        try:
            raw = _io.read_bytes(self.fs, path)
        except FileNotFoundError as err:
            raise CheckpointNotFound(
                f"no committed checkpoint {lineage}/{ckpt_id} in {self.url}; "
                f"list them with `baton ckpt ls {self.url} --lineage {lineage}`"
            ) from err
        return _decode_manifest(raw, path)

    def latest(self, lineage: str) -> Manifest | None:
        manifests = self.list(lineage)
        return manifests[-1] if manifests else None

    def best(self, lineage: str, metric: str = "loss", mode: Mode = "min") -> Manifest | None:
        scored = [m for m in self.list(lineage) if metric in m.metrics]
        if not scored:
            return None
        sign = 1 if mode == "min" else -1
        # Ties go to the newest checkpoint.
        return min(scored, key=lambda m: (sign * m.metrics[metric], tuple(-ord(c) for c in m.id)))

    def resolve(self, lineage: str, selector: str = "latest", metric: str = "loss", mode: Mode = "min") -> Manifest:
        """A checkpoint by id, `latest`, `best` (by `metric`/`mode`) or alias."""
        if selector == "latest":
            found = self.latest(lineage)
        elif selector == "best":
            found = self.best(lineage, metric, mode)
        elif selector in (aliases := self.aliases(lineage)):
            found = self.manifest(lineage, aliases[selector])
        elif _looks_like_id(selector):
            found = self.manifest(lineage, selector)
        else:
            validate_name(selector, "alias")  # a path, not a name: InvalidName
            known = ", ".join(sorted(aliases)) or "none"
            raise CheckpointNotFound(f"lineage {lineage!r} has no alias {selector!r} (aliases: {known}); "
                                     "use an id, latest, best or an alias")
        if found is None:
            raise CheckpointNotFound(f"lineage {lineage!r} has no committed checkpoint ({selector}) in {self.url}")
        return found

    def ref(self, manifest: Manifest) -> CheckpointRef:
        return CheckpointRef.from_manifest(manifest, self.uri(manifest.lineage, manifest.id))

    def uncommitted(self, lineage: str) -> dict[str, float]:
        """Checkpoint folders with no manifest: id -> age in seconds of their newest file.

        A folder whose deletion was interrupted counts as infinitely old: nothing is saving it."""
        if not self.fs.exists(self.path(lineage)):
            return {}
        committed = {p.rsplit("/", 2)[-2] for p in self._manifest_paths(lineage)}
        found: dict[str, float] = {}
        deleting: set[str] = set()
        now = time.time()
        for path, info in self.fs.find(self.path(lineage), detail=True).items():
            rel = path[len(self.path(lineage)) + 1 :].split("/")
            if len(rel) < 2 or rel[0].startswith("_") or rel[0] in committed:
                continue
            if rel[-1] == DELETING_MARKER:
                deleting.add(rel[0])
            found[rel[0]] = min(found.get(rel[0], float("inf")), now - _mtime(info))
        for ckpt_id in deleting:
            found[ckpt_id] = float("inf")
        return found

    # ---- writing ---------------------------------------------------------------------------
    def commit(
        self,
        lineage: str,
        position: Position,
        files: dict[str, Any],
        *,
        digest: str | None = None,
        metrics: dict[str, float] | None = None,
        config_hash: str = "",
        parent: str | None = None,
        versions: dict[str, str] | None = None,
        fence: int = 0,
        before_commit: Callable[[], None] | None = None,
    ) -> Manifest:
        """Write `files` (name -> bytes or Blob), then the manifest.

        `files` from `ckpt.encode` carry the model digest, computed while the files are written;
        other files need `digest`. `before_commit` may raise to refuse (fencing)."""
        if digest is None and not hasattr(files, "digest"):
            raise TypeError("commit needs digest=... unless files come from ckpt.encode()")
        ckpt_id = checkpoint_id(position.epoch, position.step)
        folder = self.path(lineage, ckpt_id)
        # Before any file is written: the files of a committed checkpoint are never overwritten.
        existing = self._existing(lineage, ckpt_id)
        if existing is not None:
            if existing.digest == (digest or files.digest):  # type: ignore[attr-defined]
                return existing
            raise CheckpointExists(f"{lineage}/{ckpt_id} is already committed with other weights")
        entries: dict[str, FileEntry] = {}
        for name, data in files.items():
            validate_name(name, "file")
            entries[name] = _io.write_file(self.fs, f"{folder}/{name}", data)
        if digest is None:
            digest = files.digest  # type: ignore[attr-defined]  # hashed while writing
        manifest = Manifest(
            lineage=lineage, id=ckpt_id, position=position, metrics=metrics or {},
            config_hash=config_hash, parent=parent, versions=versions or {}, files=entries,
            digest=digest, fence=fence,
        )
        if before_commit is not None:
            before_commit()
        _io.write_atomic(self.fs, f"{folder}/{MANIFEST_NAME}", _encode_manifest(manifest))
        return manifest

    def _existing(self, lineage: str, ckpt_id: str) -> Manifest | None:
        try:
            return self.manifest(lineage, ckpt_id)
        except (CheckpointNotFound, ValueError):
            return None

    def read(self, manifest: Manifest, name: str, verify: bool = True) -> memoryview:
        """One file of a committed checkpoint, checked against its size and hash unless told not to.

        A writable buffer: `ckpt.decode` builds tensors on it without copying."""
        entry = manifest.files.get(name)
        if entry is None:
            raise CheckpointNotFound(f"{manifest.lineage}/{manifest.id} has no file {name!r}")
        path = self.path(manifest.lineage, manifest.id, name)
        try:
            if verify:
                data, sha256 = _io.read_hashed(self.fs, path, entry.chunk_size)
            else:
                data, sha256 = memoryview(bytearray(_io.read_bytes(self.fs, path))), None
        except FileNotFoundError as err:
            raise CheckpointCorrupted(manifest.lineage, manifest.id, [f"{name}: missing"]) from err
        if verify:
            problem = _check(name, entry, len(data), sha256)
            if problem:
                raise CheckpointCorrupted(manifest.lineage, manifest.id, [problem])
        return data

    def verify(self, manifest: Manifest) -> list[str]:
        """Every problem with a committed checkpoint's files (empty when it is whole)."""
        problems = []
        for name, entry in manifest.files.items():
            try:
                size, sha256 = _io.hash_file(self.fs, self.path(manifest.lineage, manifest.id, name),
                                             entry.chunk_size)
            except FileNotFoundError:
                problems.append(f"{name}: missing (expected {entry.size} bytes)")
                continue
            problem = _check(name, entry, size, sha256)
            if problem:
                problems.append(problem)
        return problems

    def verify_lineage(self, lineage: str) -> list[str]:
        manifests, problems = self._read_manifests(lineage)
        for manifest in manifests:
            found = self.verify(manifest)
            # Files gone with their manifest were deleted (a concurrent cleanup), not corrupted.
            if found and self.fs.exists(self.path(lineage, manifest.id, MANIFEST_NAME)):
                problems += [f"{lineage}/{manifest.id}/{p}" for p in found]
        return problems

    def latest_verified(self, lineage: str, at_most_epochs: int | None = None) -> Manifest | None:
        """The newest checkpoint whose files verify, warning about each one skipped."""
        for manifest in reversed(self.list(lineage)):
            if at_most_epochs is not None and manifest.epochs_done > at_most_epochs:
                continue
            problems = self.verify(manifest)
            if not problems:
                return manifest
            log.warning("skipping corrupted checkpoint %s/%s: %s", lineage, manifest.id, "; ".join(problems))
        return None

    # ---- aliases ---------------------------------------------------------------------------
    def aliases(self, lineage: str) -> dict[str, str]:
        folder = self.path(lineage, "_aliases")
        if not self.fs.exists(folder):
            return {}
        out = {}
        for path in self.fs.glob(f"{folder}/*.json"):
            alias = path.rsplit("/", 1)[-1][: -len(".json")]
            out[alias] = json.loads(_io.read_bytes(self.fs, path))["id"]
        return out

    def pin(self, lineage: str, ckpt_id: str, alias: str) -> None:
        self.manifest(lineage, ckpt_id)  # must exist
        path = self.path(lineage, "_aliases", validate_name(alias, "alias") + ".json")
        _io.write_atomic(self.fs, path, json.dumps({"id": ckpt_id}).encode())

    def unpin(self, lineage: str, alias: str) -> None:
        path = self.path(lineage, "_aliases", validate_name(alias, "alias") + ".json")
        if not self.fs.exists(path):
            raise CheckpointNotFound(f"lineage {lineage!r} has no alias {alias!r}")
        self.fs.rm_file(path)

    # ---- deleting --------------------------------------------------------------------------
    def delete(self, lineage: str, ckpt_id: str, after_uncommit: Callable[[], None] | None = None) -> int:
        """Un-commit (manifest first), then remove the files. Returns bytes freed.

        A marker goes in first: should the process die between the manifest and the last file,
        the leftover is known to be a deletion in progress (removable at once), not a save in
        progress (which must be given its time-to-live). `after_uncommit` runs between the two
        (failure injection for tests and drills).
        """
        folder = self.path(lineage, validate_checkpoint_id(ckpt_id))
        manifest_path = f"{folder}/{MANIFEST_NAME}"
        if self.fs.exists(manifest_path):
            # No fsync: should the marker be lost in a power cut, the leftover merely waits out
            # the uncommitted ttl like any other.
            self.fs.pipe_file(f"{folder}/{DELETING_MARKER}", b"")
            self.fs.rm_file(manifest_path)
            if after_uncommit is not None:
                after_uncommit()
        return self._remove_folder(folder)

    def _remove_folder(self, folder: str) -> int:
        if not self.fs.exists(folder):
            return 0
        if self.is_local:
            return _remove_local_folder(folder)
        files = self.fs.find(folder, detail=True)
        freed = sum(int(info.get("size") or 0) for info in files.values())
        # The deletion marker goes last, so that it outlives every file it speaks for.
        for path in sorted(files, key=lambda p: p.endswith(DELETING_MARKER)):
            self.fs.rm_file(path)
        return freed


def _looks_like_id(value: str) -> bool:
    try:
        validate_checkpoint_id(value)
    except CheckpointError:
        return False
    return True


def _remove_local_folder(folder: str) -> int:
    freed = 0
    entries = sorted(os.scandir(folder), key=lambda e: e.name == DELETING_MARKER)  # the marker last
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            freed += _remove_local_folder(entry.path)
        else:
            freed += entry.stat(follow_symlinks=False).st_size
            os.unlink(entry.path)
    os.rmdir(folder)
    return freed


def _check(name: str, entry: FileEntry, size: int, actual: str | None) -> str | None:
    if size != entry.size:
        return f"{name}: size {size} bytes, expected {entry.size}"
    if actual != entry.sha256:
        kind = "sha256" if entry.chunk_size is None else "chunked sha256"
        return f"{name}: {kind} {actual[:12]}..., expected {entry.sha256[:12]}..."  # type: ignore[index]
    return None


def _mtime(info: dict) -> float:
    value = info.get("mtime") or info.get("LastModified") or info.get("created")
    if isinstance(value, datetime):
        return value.replace(tzinfo=value.tzinfo or timezone.utc).timestamp()
    if value is None:
        return time.time()
    return float(value)

