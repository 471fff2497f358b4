"""The multi-writer commit: every rank writes its own part of a checkpoint, rank 0 commits them all.

    part = store.write_part(lineage, ckpt_id, rank, {"data.distcp": blob})    # on every rank
    parts = <gather the parts to rank 0>                                     # the caller's collective
    store.commit_parts(lineage, position, parts, before_commit=fence_check)  # on rank 0, last

A part's files are named `rank-00001.<name>`, so ranks never collide, and are hashed (BLAKE3) and
made durable (fsync, or one finished PUT) before `write_part` returns: by the time rank 0 holds every
part, every file is durable, and the manifest, written once and last, commits the checkpoint. A
rank that dies or fails while writing never sends its part: the folder stays uncommitted and the
leftover rules of ckpt/_removal.py and retention remove it.

Files of a committed checkpoint are never overwritten: a part written into a folder that already
has a manifest (a re-run after a commit whose report was lost, the repair of a damaged checkpoint)
gets names with a fresh token (`rank-00001-3f9a1c2e.<name>`); `commit_parts` then keeps the
existing checkpoint (removing the new files) or replaces a damaged one, in the crash-safe order of
`CheckpointStore._uncommit_damaged`.

`ShardedCommit` is the multi-writer half of `ckpt.store.CheckpointStore`, as `StoreRemoval` is its
removing half.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from . import _io
from ._blob import blake3_hex
from .errors import CheckpointError, CheckpointExists, InvalidArgument
from .manifest import MANIFEST_NAME, FileEntry, Manifest, Position, encode_manifest
from .names import checkpoint_id, validate_checkpoint_id, validate_name

__all__ = ["IncompletePart", "Part", "ShardedCommit", "logical_name", "parts_digest", "rank_files"]

log = logging.getLogger("baton.ckpt")

_STORED = re.compile(r"rank-([0-9]{5})(?:-([0-9a-f]{8}))?\.(.+)")
MAX_RANK = 99_999


class IncompletePart(CheckpointError):
    """A part handed to `commit_parts` whose files are not all in the store (a rank's write did not
    finish, or the parts come from another attempt): nothing is committed."""


class Part(BaseModel):
    """What one rank wrote into a checkpoint's folder: returned by `write_part`, gathered to rank 0
    (it pickles and serialises to JSON), committed by `commit_parts`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lineage: str
    id: str
    rank: int = Field(ge=0, le=MAX_RANK)
    files: dict[str, FileEntry] = Field(description="Stored name (inside the checkpoint's folder) -> size, "
                                                    "BLAKE3 and rank.")


def stored_name(rank: int, name: str, token: str | None = None) -> str:
    return f"rank-{rank:05d}{'-' + token if token else ''}.{name}"


def logical_name(stored: str) -> tuple[int, str] | None:
    """(rank, name as the rank gave it) of a part's file; None for a file of a single writer."""
    found = _STORED.fullmatch(stored)
    return (int(found.group(1)), found.group(3)) if found else None


def rank_files(manifest: Manifest) -> dict[int, dict[str, str]]:
    """rank -> {name as that rank gave it -> stored name} of a checkpoint's parts."""
    out: dict[int, dict[str, str]] = {}
    for stored in manifest.files:
        parsed = logical_name(stored)
        if parsed is not None:
            out.setdefault(parsed[0], {})[parsed[1]] = stored
    return out


def parts_digest(files: Mapping[str, FileEntry]) -> str:
    """The digest of a sharded checkpoint: the BLAKE3 of every part file's (rank, name, size, hash).

    Equal iff the ranks wrote the same bytes under the same names: a deterministic re-run of the
    same steps on the same world size gives the same digest (a fresh token does not count)."""
    rows = []
    for stored, entry in files.items():
        rank, name = logical_name(stored) or (entry.rank, stored)
        rows.append([rank, name, entry.size, entry.expected])
    return blake3_hex(json.dumps(sorted(rows), separators=(",", ":")).encode())


def _merge(parts: Iterable[Part], lineage: str, ckpt_id: str) -> dict[str, FileEntry]:
    files: dict[str, FileEntry] = {}
    for part in parts:
        if not isinstance(part, Part):
            raise InvalidArgument(f"commit_parts takes the Part objects that write_part returned, got {type(part).__name__}")
        if (part.lineage, part.id) != (lineage, ckpt_id):
            raise InvalidArgument(f"rank {part.rank}'s part was written for {part.lineage}/{part.id}, "
                                  f"not {lineage}/{ckpt_id}: every rank must write the checkpoint being committed")
        for stored, entry in part.files.items():
            if stored in files:
                raise InvalidArgument(f"two parts hold the file {stored!r} of {lineage}/{ckpt_id}: "
                                      "give each rank's write_part its own rank")
            files[stored] = entry
    return files


class ShardedCommit:
    """`write_part` on every rank, `commit_parts` on rank 0. Works on `CheckpointStore`'s `fs`,
    `path`, `_existing`, `verify`, `read` and `_uncommit_damaged`."""

    def write_part(self, lineage: str, ckpt_id: str, rank: int, files: Mapping[str, Any]) -> Part:
        """Write one rank's files (name -> bytes, buffer or Blob) into checkpoint `ckpt_id`'s folder,
        each hashed while written and durable on return. Commits nothing."""
        validate_name(lineage)
        validate_checkpoint_id(ckpt_id)
        if not isinstance(rank, int) or not 0 <= rank <= MAX_RANK:
            raise InvalidArgument(f"rank must be an int in [0, {MAX_RANK}], got {rank!r}")
        for name in files:
            validate_name(name, "file")
        # Never overwrite a committed checkpoint's files: a reader may be loading them right now.
        token = uuid.uuid4().hex[:8] if self._existing(lineage, ckpt_id) is not None else None  # type: ignore[attr-defined]
        entries = {}
        for name, data in files.items():
            stored = stored_name(rank, name, token)
            entry = _io.write_file(self.fs, self.path(lineage, ckpt_id, stored), data)  # type: ignore[attr-defined]
            entries[stored] = entry.model_copy(update={"rank": rank})
        return Part(lineage=lineage, id=ckpt_id, rank=rank, files=entries)

    def commit_parts(
        self,
        lineage: str,
        position: Position,
        parts: Iterable[Part],
        *,
        digest: str | None = None,
        metrics: dict[str, float] | None = None,
        config_hash: str = "",
        parent: str | None = None,
        versions: dict[str, str] | None = None,
        fence: int = 0,
        before_commit: Callable[[], None] | None = None,
        load_problems: Callable[[Manifest], list[str]] | None = None,
    ) -> Manifest:
        """Commit the parts every rank wrote: one manifest, written last (rank 0 only).

        `digest` defaults to `parts_digest`. `before_commit` may raise to refuse (fencing, as for
        `commit`). `load_problems(existing)` says why the files of an already committed checkpoint
        (its manifest) do not load although their hashes match (a planted pickle): that checkpoint is
        then replaced. An already committed checkpoint that verifies is returned when its digest is
        this one (`CheckpointExists` otherwise), and the files just written for it are removed."""
        ckpt_id = checkpoint_id(position.epoch, position.step)
        files = _merge(parts, validate_name(lineage), ckpt_id)
        self._check_present(lineage, ckpt_id, files)
        digest = digest or parts_digest(files)
        existing = self._existing(lineage, ckpt_id)  # type: ignore[attr-defined]
        if existing is not None:
            problems = self.verify(existing) or self._parts_load_problems(existing, load_problems)  # type: ignore[attr-defined]
            if not problems:
                self._remove_files(lineage, ckpt_id, set(files) - set(existing.files))
                if existing.digest == digest:
                    return existing
                raise CheckpointExists(f"{lineage}/{ckpt_id} is already committed with other state")
            self._uncommit_damaged(existing, problems, before_commit, set(files))  # type: ignore[attr-defined]
        manifest = Manifest(lineage=lineage, id=ckpt_id, position=position, metrics=metrics or {},
                            config_hash=config_hash, parent=parent, versions=versions or {}, files=files,
                            digest=digest, fence=fence)
        if before_commit is not None:
            before_commit()
        _io.write_atomic(self.fs, self.path(lineage, ckpt_id, MANIFEST_NAME), encode_manifest(manifest))  # type: ignore[attr-defined]
        return manifest

    def _check_present(self, lineage: str, ckpt_id: str, files: Mapping[str, FileEntry]) -> None:
        """Every part's file is in the store with its size: one listing, no file read. (Each was made
        durable by its rank before the part was sent; this catches parts of another attempt.)"""
        folder = self.path(lineage, ckpt_id)  # type: ignore[attr-defined]
        try:
            found = self.fs.find(folder, detail=True)  # type: ignore[attr-defined]
        except FileNotFoundError:
            found = {}
        sizes = {path.rstrip("/").rsplit("/", 1)[-1]: int(info.get("size") or 0) for path, info in found.items()}
        problems = [f"{name}: missing" if name not in sizes else f"{name}: {sizes[name]} bytes, the part says {entry.size}"
                    for name, entry in sorted(files.items()) if sizes.get(name) != entry.size]
        if problems:
            raise IncompletePart(f"not committing {lineage}/{ckpt_id}: " + "; ".join(problems)
                                 + ". Every rank must finish write_part before rank 0 commits its parts")

    def _parts_load_problems(self, existing: Manifest, check) -> list[str]:
        if check is None:
            return []
        try:
            return check(existing)
        except CheckpointError as err:
            return [str(err)]

    def _remove_files(self, lineage: str, ckpt_id: str, names: set[str]) -> None:
        for name in names:
            try:
                self.fs.rm_file(self.path(lineage, ckpt_id, name))  # type: ignore[attr-defined]
            except FileNotFoundError:
                pass
