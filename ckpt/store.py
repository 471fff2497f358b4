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
from typing import Any, Callable, Literal

from . import _io
from .errors import (
    CheckpointCorrupted,
    CheckpointError,
    CheckpointExists,
    CheckpointNotFound,
    InvalidArgument,
    UnreadableFile,
)
from ._removal import DELETING_MARKER, StoreRemoval
from .faults import fault_point
from .manifest import MANIFEST_NAME, CheckpointRef, FileEntry, Manifest, Position, decode_manifest, encode_manifest
from .names import checkpoint_id, validate_checkpoint_id, validate_name
from .sharded import ShardedCommit

# DELETING_MARKER lives in ckpt/_removal.py; its import path stays ckpt.store.
__all__ = ["DELETING_MARKER", "CheckpointStore", "Mode"]

log = logging.getLogger("baton.ckpt")

Mode = Literal["min", "max"]

# The codec moved to manifest.py; these names stay for the benchmarks and older callers.
_encode_manifest = encode_manifest
_decode_manifest = decode_manifest


class CheckpointStore(StoreRemoval, ShardedCommit):
    """Checkpoints of every lineage under one root: a local folder or any fsspec URL.

    Leftovers of failed writes and deleting (`leftovers`, `uncommitted`, `delete`, `remove_leftover`,
    `remove_temp_file`) are `StoreRemoval`, in ckpt/_removal.py; the multi-writer commit of sharded
    state (`write_part` on every rank, `commit_parts` on rank 0) is `ShardedCommit`, in ckpt/sharded.py."""

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
        """Committed checkpoints of `lineage`, oldest first, from their manifests alone (no file
        is hashed: see `verify`, `latest_verified`). Unreadable manifests are skipped."""
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
                manifests.append(decode_manifest(blobs[path], path))
            except UnreadableFile as err:
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
        """One committed checkpoint's manifest; `ManifestUnreadable` (naming the file) if garbled."""
        path = self.path(lineage, validate_checkpoint_id(ckpt_id), MANIFEST_NAME)
        try:
            raw = _io.read_bytes(self.fs, path)
        except FileNotFoundError as err:
            raise CheckpointNotFound(
                f"no committed checkpoint {lineage}/{ckpt_id} in {self.url}; "
                f"list them with `baton ckpt ls {self.url} --lineage {lineage}`"
            ) from err
        return decode_manifest(raw, path)

    def latest(self, lineage: str) -> Manifest | None:
        """The newest committed checkpoint, by its manifest alone: cheap, but its files may be
        damaged. `latest_verified` is the newest one whose files verify."""
        manifests = self.list(lineage)
        return manifests[-1] if manifests else None

    def best(self, lineage: str, metric: str = "loss", mode: Mode = "min", verified: bool = False) -> Manifest | None:
        """The best checkpoint by `metric`; with `verified`, the best one whose files verify."""
        for manifest in self._ranked(lineage, metric, mode):
            if not verified or self._whole(manifest):
                return manifest
        return None

    def _ranked(self, lineage: str, metric: str, mode: Mode) -> list[Manifest]:
        scored = [m for m in self.list(lineage) if metric in m.metrics]
        sign = 1 if mode == "min" else -1
        # Ties go to the newest checkpoint.
        return sorted(scored, key=lambda m: (sign * m.metrics[metric], tuple(-ord(c) for c in m.id)))

    def resolve(self, lineage: str, selector: str = "latest", metric: str = "loss", mode: Mode = "min",
                verified: bool = False) -> Manifest:
        """A checkpoint by id, `latest`, `best` (by `metric`/`mode`) or alias.

        With `verified`, its files are checked first: `latest` and `best` fall back to the newest
        (or best) checkpoint that verifies; an id or alias names one checkpoint, so a damaged one
        raises `CheckpointCorrupted` at once."""
        if selector == "latest":
            found = self.latest_verified(lineage) if verified else self.latest(lineage)
        elif selector == "best":
            found = self.best(lineage, metric, mode, verified=verified)
        else:
            found = self._named(lineage, selector)
            if verified and (problems := self.verify(found)):
                raise CheckpointCorrupted(lineage, found.id, problems)
        if found is None:
            raise CheckpointNotFound(f"lineage {lineage!r} has no committed checkpoint ({selector}) in {self.url}"
                                     + (" whose files verify" if verified else ""))
        return found

    def _named(self, lineage: str, selector: str) -> Manifest:
        if selector in (aliases := self.aliases(lineage)):
            return self.manifest(lineage, aliases[selector])
        if _looks_like_id(selector):
            return self.manifest(lineage, selector)
        validate_name(selector, "alias")  # a path, not a name: InvalidName
        known = ", ".join(sorted(aliases)) or "none"
        raise CheckpointNotFound(f"lineage {lineage!r} has no alias {selector!r} (aliases: {known}); "
                                 "use an id, latest, best or an alias")

    def ref(self, manifest: Manifest) -> CheckpointRef:
        return CheckpointRef.from_manifest(manifest, self.uri(manifest.lineage, manifest.id))

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
        other files need `digest`. `before_commit` may raise to refuse (fencing).

        If this id is already committed and its files verify, that checkpoint is returned when
        its weights are these (`CheckpointExists` otherwise) and nothing is written. If its files
        are damaged or missing, or (for `files` of a format that can tell, as `ckpt.encode`'s) do
        not load, it is replaced by this one (see `_uncommit_damaged`)."""
        if digest is None and not hasattr(files, "digest"):
            raise InvalidArgument("commit needs digest=... unless files come from ckpt.encode()")
        for name in files:
            validate_name(name, "file")
        ckpt_id = checkpoint_id(position.epoch, position.step)
        folder = self.path(lineage, ckpt_id)
        existing = self._existing(lineage, ckpt_id)
        if existing is not None:
            problems = self.verify(existing) or self._load_problems(existing, files)
            if not problems:
                # The files of a whole committed checkpoint are never overwritten.
                if _same_weights(existing, files, digest):
                    return existing
                raise CheckpointExists(f"{lineage}/{ckpt_id} is already committed with other weights")
            self._uncommit_damaged(existing, problems, before_commit, set(files))
        entries = {name: _io.write_file(self.fs, f"{folder}/{name}", data) for name, data in files.items()}
        manifest = Manifest(
            lineage=lineage, id=ckpt_id, position=position, metrics=metrics or {},
            config_hash=config_hash, parent=parent, versions=versions or {}, files=entries,
            digest=digest or files.digest, fence=fence,  # type: ignore[attr-defined]  # hashed while writing
        )
        if before_commit is not None:
            before_commit()
        _io.write_atomic(self.fs, f"{folder}/{MANIFEST_NAME}", encode_manifest(manifest))
        return manifest

    def _uncommit_damaged(self, damaged: Manifest, problems: list[str],
                          before_commit: Callable[[], None] | None, keeping: set[str]) -> None:
        """Take a committed checkpoint with damaged files out of the lineage before rewriting them.

        Crash-safe order: (1) the fencing check, so that a writer whose lease was taken over never
        un-commits what the new holder may have just repaired; (2) the manifest goes, before any
        file is touched, so no reader ever sees it pointing at files being rewritten; (3) the
        caller rewrites the files and (4) commits a new manifest, last, as for any checkpoint.
        Killed after (2), the lineage looks as if this checkpoint had never been committed (its
        predecessor is the latest) and the folder is an uncommitted leftover whose fresh files
        keep cleanup off it for `uncommitted_ttl`; the next commit of this id writes it whole."""
        log.warning("replacing damaged checkpoint %s/%s: %s", damaged.lineage, damaged.id, "; ".join(problems))
        if before_commit is not None:
            before_commit()
        folder = self.path(damaged.lineage, damaged.id)
        self._remove_file(f"{folder}/{MANIFEST_NAME}")
        fault_point("repair.after_uncommit")
        for name in set(damaged.files) - keeping:  # files the new checkpoint does not have
            self._remove_file(f"{folder}/{name}")

    def _load_problems(self, existing: Manifest, files: Any) -> list[str]:
        check = getattr(files, "load_problems", None)
        if check is None:
            return []
        try:
            return check(lambda name: self.read(existing, name))
        except CheckpointError as err:  # a file it needs is missing, or changed since verify
            return [str(err)]

    def _existing(self, lineage: str, ckpt_id: str) -> Manifest | None:
        try:
            return self.manifest(lineage, ckpt_id)
        except (CheckpointNotFound, UnreadableFile):  # an unreadable manifest commits nothing
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
                data, actual = _io.read_hashed(self.fs, path, entry)
            else:
                data, actual = memoryview(bytearray(_io.read_bytes(self.fs, path))), None
        except FileNotFoundError as err:
            raise CheckpointCorrupted(manifest.lineage, manifest.id, [f"{name}: missing"]) from err
        if verify:
            problem = _check(name, entry, len(data), actual)
            if problem:
                raise CheckpointCorrupted(manifest.lineage, manifest.id, [problem])
        return data

    def verify(self, manifest: Manifest) -> list[str]:
        """Every problem with a committed checkpoint's files (empty when it is whole)."""
        problems = []
        for name, entry in manifest.files.items():
            try:
                size, actual = _io.hash_file(self.fs, self.path(manifest.lineage, manifest.id, name), entry)
            except FileNotFoundError:
                problems.append(f"{name}: missing (expected {entry.size} bytes)")
                continue
            problem = _check(name, entry, size, actual)
            if problem:
                problems.append(problem)
        return problems

    def _whole(self, manifest: Manifest) -> bool:
        problems = self.verify(manifest)
        if problems:
            log.warning("skipping damaged checkpoint %s/%s: %s", manifest.lineage, manifest.id, "; ".join(problems))
        return not problems

    def verify_lineage(self, lineage: str) -> list[str]:
        manifests, problems = self._read_manifests(lineage)
        for manifest in manifests:
            found = self.verify(manifest)
            # Files gone with their manifest were deleted (a concurrent cleanup), not corrupted.
            if found and self.fs.exists(self.path(lineage, manifest.id, MANIFEST_NAME)):
                problems += [f"{lineage}/{manifest.id}/{p}" for p in found]
        return problems

    def latest_verified(self, lineage: str, at_most_epochs: int | None = None) -> Manifest | None:
        """The newest checkpoint whose files verify, warning about each one skipped: where
        training resumes from. Hashes the newest checkpoints until one is whole."""
        for manifest in reversed(self.list(lineage)):
            if at_most_epochs is not None and manifest.epochs_done > at_most_epochs:
                continue
            if self._whole(manifest):
                return manifest
        return None

    # ---- aliases ---------------------------------------------------------------------------
    def aliases(self, lineage: str) -> dict[str, str]:
        """alias -> checkpoint id. A garbled alias file is skipped with a warning naming it."""
        folder = self.path(lineage, "_aliases")
        if not self.fs.exists(folder):
            return {}
        out = {}
        for path in self.fs.glob(f"{folder}/*.json"):
            try:
                alias = validate_name(path.rsplit("/", 1)[-1][: -len(".json")], "alias")
                out[alias] = _alias_target(path, _io.read_bytes(self.fs, path))
            except FileNotFoundError:  # unpinned meanwhile
                continue
            except CheckpointError as err:
                log.warning("skipping alias file %s: %s", path, err)
        return out

    def mark_once(self, lineage: str, folder: str, name: str) -> bool:
        """Create the empty marker `<lineage>/<folder>/<name>` unless it exists; True if this call
        created it (exclusive on local disks and S3 alike). For things that must happen once per
        lineage, such as a drill's failure firing."""
        validate_name(folder.lstrip("_"), "marker folder")
        validate_name(name, "marker")
        return _io.write_exclusive(self.fs, self.path(lineage, folder, name), b"")

    def pin(self, lineage: str, ckpt_id: str, alias: str) -> None:
        self.manifest(lineage, ckpt_id)  # must exist
        path = self.path(lineage, "_aliases", validate_name(alias, "alias") + ".json")
        _io.write_atomic(self.fs, path, json.dumps({"id": ckpt_id}).encode())

    def unpin(self, lineage: str, alias: str) -> None:
        path = self.path(lineage, "_aliases", validate_name(alias, "alias") + ".json")
        if not self.fs.exists(path):
            raise CheckpointNotFound(f"lineage {lineage!r} has no alias {alias!r}")
        self._remove_file(path)


def _alias_target(path: str, raw: bytes) -> str:
    try:
        return validate_checkpoint_id(json.loads(raw)["id"])
    except (ValueError, KeyError, TypeError) as err:  # not JSON, not an object, no or a bad id
        raise UnreadableFile(path, "alias", f"{err.__class__.__name__}: {err}",
                             "Pin the alias again with `baton ckpt pin`, or delete that file") from err


def _looks_like_id(value: str) -> bool:
    try:
        validate_checkpoint_id(value)
    except CheckpointError:
        return False
    return True


def _same_weights(existing: Manifest, files: Any, digest: str | None) -> bool:
    """Whether `files` (or `digest`) hold the weights of an already committed checkpoint, also one
    written before BLAKE3 (its digest is a chunked sha256: `files` can say how they hash that way)."""
    if digest is not None:
        return existing.digest == digest
    if existing.version >= 3:
        return existing.digest == files.digest
    return files.same_weights_as(existing)


def _check(name: str, entry: FileEntry, size: int, actual: str | None) -> str | None:
    if size != entry.size:
        return f"{name}: size {size} bytes, expected {entry.size}"
    if actual != entry.expected:
        return f"{name}: {entry.kind} {actual[:12]}..., expected {entry.expected[:12]}..."  # type: ignore[index]
    return None
