"""What failed writes and deletions leave in a lineage, and removing checkpoints and those leftovers
in a crash-safe order (the deletion marker first and last, the manifest before any file).

`StoreRemoval` is the removing half of `ckpt.store.CheckpointStore` and works on its `fs`, `path`,
`is_local` and `_manifest_paths`."""

from __future__ import annotations

import logging
import time

from . import _io
from .errors import InvalidArgument
from .faults import fault_point
from .manifest import MANIFEST_NAME
from .names import validate_checkpoint_id

log = logging.getLogger("baton.ckpt")

DELETING_MARKER = "deleting.marker"


class StoreRemoval:
    """Leftovers of failed writes, and deleting: checkpoints, leftover folders, temporary files."""

    def uncommitted(self, lineage: str) -> dict[str, float]:
        """Checkpoint folders with no manifest: id -> age in seconds of their newest file.

        A folder whose deletion was interrupted counts as infinitely old: nothing is saving it."""
        return self.leftovers(lineage)[0]

    def leftovers(self, lineage: str) -> tuple[dict[str, float], dict[str, float]]:
        """What failed or interrupted writes left behind, from one recursive listing:
        (`uncommitted` folders, temporary files of atomic writes anywhere in the lineage: path
        relative to the lineage -> age in seconds)."""
        if not self.fs.exists(self.path(lineage)):
            return {}, {}
        committed = {p.rsplit("/", 2)[-2] for p in self._manifest_paths(lineage)}
        folders: dict[str, float] = {}
        temps: dict[str, float] = {}
        deleting: set[str] = set()
        now, base = time.time(), self.path(lineage)
        for path, info in self.fs.find(base, detail=True).items():
            rel = path[len(base) + 1 :].split("/")
            age = now - _io.mtime(info)
            if _io.is_temp_name(rel[-1]):
                temps["/".join(rel)] = age
            if len(rel) < 2 or rel[0].startswith("_") or rel[0] in committed:
                continue
            if rel[-1] == DELETING_MARKER:
                deleting.add(rel[0])
            folders[rel[0]] = min(folders.get(rel[0], float("inf")), age)
        for ckpt_id in deleting:
            folders[ckpt_id] = float("inf")
        return folders, temps

    # ---- deleting --------------------------------------------------------------------------
    def delete(self, lineage: str, ckpt_id: str) -> int:
        """Un-commit (manifest first), then remove the files. Returns bytes freed.

        A marker goes in first: should the process die between the manifest and the last file,
        the leftover is known to be a deletion in progress (removable at once), not a save in
        progress (which must be given its time-to-live). Several deleters may race on one
        checkpoint (concurrent cleanups): what another one removed first is not an error.
        """
        folder = self.path(lineage, validate_checkpoint_id(ckpt_id))
        manifest_path = f"{folder}/{MANIFEST_NAME}"
        if self.fs.exists(manifest_path):
            # No fsync: should the marker be lost in a power cut, the leftover merely waits out
            # the uncommitted ttl like any other.
            try:
                self.fs.pipe_file(f"{folder}/{DELETING_MARKER}", b"")
            except (FileNotFoundError, FileExistsError):
                # The folder went while this made sure it existed: another deleter got there first.
                return self._remove_folder(folder)
            self._remove_file(manifest_path)
            fault_point("delete.after_uncommit")
        return self._remove_folder(folder)

    def remove_leftover(self, lineage: str, ckpt_id: str) -> int:
        """Remove a checkpoint folder that has no manifest; bytes freed. A folder that got its
        manifest since it was found is a committed checkpoint now: it is left alone (0)."""
        folder = self.path(lineage, validate_checkpoint_id(ckpt_id))
        if self.fs.exists(f"{folder}/{MANIFEST_NAME}"):
            log.info("leftover %s/%s was committed meanwhile; keeping it", lineage, ckpt_id)
            return 0
        return self._remove_folder(folder)

    def remove_temp_file(self, lineage: str, relative: str) -> int:
        """Remove a temporary file of a failed atomic write (path relative to the lineage, as
        `leftovers` names it); bytes freed. Refuses any other file."""
        parts = relative.split("/")
        if not _io.is_temp_name(parts[-1]) or any(p in ("", ".", "..") for p in parts):
            raise InvalidArgument(f"{lineage}/{relative} is not a temporary file of an atomic write")
        path = self.path(lineage, *parts)
        try:
            size = int(self.fs.info(path).get("size") or 0)
        except FileNotFoundError:
            return 0
        return size if self._remove_file(path) else 0

    def _remove_file(self, path: str) -> bool:
        """False when it was already gone (removed by someone else meanwhile)."""
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            return False
        return True

    def _remove_folder(self, folder: str) -> int:
        # The deletion marker goes last, so that it outlives every file it speaks for.
        if self.is_local:
            return _io.remove_local_tree(folder, last=DELETING_MARKER)
        return _io.remove_remote_files(self.fs, folder, last=DELETING_MARKER)
