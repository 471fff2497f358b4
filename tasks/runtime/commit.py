"""Rank 0's side of a checkpoint: encode, write, commit (fenced), in the foreground or the background."""

from __future__ import annotations

import functools
import importlib.metadata
import logging

from ckpt import CheckpointStore, Lease, Manifest, TrainingState, checkpoint_id, encode
from ckpt.async_save import AsyncSaver

from . import faults
from .spec import BlockSpec

log = logging.getLogger("baton.worker")


class Committer:
    """Rank 0's commits of one lineage, each for the block it is handed (a warm group's workers go
    from block to block, and a commit carries its own block's fence and failure injection)."""

    def __init__(self, store: CheckpointStore, lineage: str, *, background: bool):
        self.store, self.lineage = store, lineage
        self.parent: str | None = None
        self.saver = AsyncSaver(name=f"baton-save-{lineage}") if background else None

    def resumed_from(self, parent: str) -> None:
        self.parent = parent

    def commit(self, state: TrainingState, metrics: dict[str, float], block: BlockSpec) -> BaseException | None:
        """Commit `state` as a checkpoint of `block`. Returns the failure instead of raising it:
        every rank must learn of it first."""
        try:
            if self.saver is None:
                self.parent = self._write(state, metrics, self.parent, block).id
            else:
                self._commit_async(state, metrics, block)
        except BaseException as err:
            return err
        return None

    def _commit_async(self, state: TrainingState, metrics: dict[str, float], block: BlockSpec) -> None:
        """Snapshot now (the only part training waits for; device tensors go to pinned host
        buffers), write and commit in the background."""
        parent, ckpt_id = self.parent, checkpoint_id(state.position.epoch, state.position.step)
        self.saver.save(state, lambda snapshot: self._write(snapshot, metrics, parent, block), label=ckpt_id)
        log.debug("checkpoint %s: training stalled %.3f s (%.3f s waiting for the previous save)",
                  ckpt_id, self.saver.last_stall_s, self.saver.last_wait_s)
        self.parent = ckpt_id  # the id is fixed by the position: the next checkpoint can name it already

    def close(self) -> BaseException | None:
        if self.saver is None:
            return None
        try:
            self.saver.close()
        except BaseException as err:
            return err
        return None

    def abandon(self) -> None:
        if self.saver is not None and self.saver.in_flight:
            try:
                self.saver.close()
            except Exception as err:
                log.error("the background save in flight when training failed did not commit: %s", err)

    def _write(self, state: TrainingState, metrics: dict[str, float], parent: str | None,
               spec: BlockSpec) -> Manifest:
        files = encode(state)
        position = state.position

        def before_commit() -> None:
            # Files are written, the manifest is not: the moment a crash must never expose.
            faults.before_commit(spec.settings.fail, self.store, spec.lineage, position.epoch, position.batch_in_epoch - 1)
            if spec.fence:
                Lease.check(self.store, spec.lineage, spec.fence)

        return self.store.commit(spec.lineage, position, files, metrics=metrics, config_hash=spec.config_hash,
                                 parent=parent, versions=dict(versions()), fence=spec.fence,
                                 before_commit=before_commit)


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    out = {}
    for package in ("torch", "ray", "safetensors", "baton"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
