"""What of a TrainContext becomes a checkpoint and comes back from one: the training state it
saves, where a block starts from (the newest good checkpoint, else the warm start), and applying
that state to the loop's objects, its metric sums and every rank's RNG.

`ResumeMixin` is one half of `tasks.context.TrainContext` and works on its attributes (`_objects`,
`_user_state`, `_position`, `_restored`, `_sums`, `_counts`, `_committer`, `store`, `spec`...)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ckpt import CheckpointError, CheckpointStore, Manifest, Position, TrainingState, decode, restore_rng

from . import faults

log = logging.getLogger("baton.worker")


# Objects restored into the matching field of a checkpoint; any other keyword goes to `objects`.
_TOP_LEVEL = ("model", "optimizer", "scheduler")


class ResumeMixin:
    """The checkpoint side of `TrainContext`: build its `TrainingState`, load one, apply it."""

    def _training_state(self, ranks: list[dict[str, Any]] | None, sums, counts) -> TrainingState:
        objects = self._objects
        extra = {"user": self._user_state,
                 "objects": {k: v.state_dict() for k, v in objects.items() if k not in _TOP_LEVEL},
                 "loaders": [r["loaders"] for r in ranks or []]}
        return TrainingState(
            model=objects["model"].state_dict(), position=self._position,
            optimizer=objects["optimizer"].state_dict() if "optimizer" in objects else None,
            scheduler=objects["scheduler"].state_dict() if "scheduler" in objects else None,
            rng=[r["rng"] for r in ranks or []], progress={"sums": sums, "counts": counts}, extra=extra)

    def _load(self) -> TrainingState | None:
        manifest, state = newest_good(self.store, self.spec.lineage)
        if manifest is not None:
            self._committer and self._committer.resumed_from(manifest.id)
            if self.rank == 0:
                log.info("resuming %s from %s (epoch %d, batch %d, step %d)", self.spec.lineage, manifest.id,
                         state.position.epoch, state.position.batch_in_epoch, state.position.step)
            return state
        if self.spec.settings.init_from:
            return self._warm_start()
        return None

    def _warm_start(self) -> TrainingState | None:
        source, selector = self.spec.settings.init_source
        manifest = self.store.resolve(source, selector, verified=True)
        state = decode({name: self.store.read(manifest, name) for name in manifest.files})
        self._objects["model"].load_state_dict(state.model)
        parent = f"{source}/{manifest.id}"
        self._committer and self._committer.resumed_from(parent)
        if self.rank == 0:
            log.info("warm start of %s from %s (%s)", self.spec.lineage, parent, self.spec.settings.init_mode)
        if self.spec.settings.init_mode == "weights":
            return None
        # `full`: the whole training state, but a new lineage starts at epoch 0 with fresh counters.
        return TrainingState(model=state.model, optimizer=state.optimizer, scheduler=state.scheduler,
                             rng=state.rng, extra=state.extra,
                             position=Position(epoch=0, batch_in_epoch=0, epoch_complete=False, step=0))

    def _apply(self, state: TrainingState) -> None:
        objects = self._objects
        objects["model"].load_state_dict(state.model)
        if "optimizer" in objects and state.optimizer is not None:
            objects["optimizer"].load_state_dict(state.optimizer)
        if "scheduler" in objects and state.scheduler is not None:
            objects["scheduler"].load_state_dict(state.scheduler)
        extra = state.extra if "objects" in state.extra else {"user": state.extra, "objects": {}, "loaders": []}
        for name, obj in objects.items():
            if name not in _TOP_LEVEL and name in extra["objects"]:
                obj.load_state_dict(_json_keys_back(obj, extra["objects"][name]))
        self._user_state.clear()
        self._user_state.update(extra.get("user") or {})
        self._position, self._restored = state.position, state
        if not state.position.epoch_complete:  # a mid-epoch resume continues the epoch's means
            progress = state.progress
            if self.rank == 0 and "sums" in progress:
                self._sums, self._counts = dict(progress["sums"]), dict(progress["counts"])
            elif "sums" in progress:
                self._sums, self._counts = {}, {k: 0.0 for k in progress["counts"]}

    def _restore_rng(self) -> None:
        # Last thing before the first forward pass: every rank's own RNG state, exactly.
        state = self._restored
        if state is not None and len(state.rng) == self.world_size and "rng" not in faults.omitted():
            restore_rng(state.rng[self.rank])
            return
        if state is not None and state.rng and len(state.rng) != self.world_size:
            log.warning("the checkpoint has RNG states for %d ranks, this run has %d: reseeding, so this "
                        "resume is not bit-exact", len(state.rng), self.world_size)
        seed_rank(self.params.seed, self.rank, self._position.step)


def _json_keys_back(obj: Any, state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's per-parameter state is keyed by int; a checkpoint's JSON keys are strings."""
    if isinstance(obj, torch.optim.Optimizer) and isinstance(state.get("state"), dict):
        return {**state, "state": {int(k): v for k, v in state["state"].items()}}
    return state


def seed_rank(seed: int, rank: int, step: int) -> None:
    import random

    import numpy as np

    value = (seed * 1_000_003 + rank * 7919 + step) % 2**32
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def newest_good(store: CheckpointStore, lineage: str) -> tuple[Manifest | None, TrainingState | None]:
    """The newest committed checkpoint whose files verify and decode: a corrupt one is skipped (and
    logged), never loaded. Each file is read once: verifying already reads them all."""
    for manifest in reversed(store.list(lineage)):
        try:
            return manifest, decode({name: store.read(manifest, name) for name in manifest.files})
        except (CheckpointError, ValueError, KeyError, TypeError) as err:
            log.warning("skipping checkpoint %s/%s, which cannot be loaded: %s", lineage, manifest.id, err)
    return None, None
