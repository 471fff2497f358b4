"""What of a rank becomes a checkpoint and comes back from one: the `TrainingState` it saves, where
a block starts from (the lineage's newest good checkpoint, else the warm start), applying that state
to the loop's registered objects, each rank's data-loader positions, and every rank's RNG.

A `Resumer` is told everything it works on (the registered objects, the user state, the position,
what every rank gathered); it keeps no training state of its own."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ckpt import CheckpointError, CheckpointStore, Manifest, Position, TrainingState, decode, restore_rng

from . import faults
from .errors import LoopError
from .settings import TrainSettings

log = logging.getLogger("baton.worker")


# Objects restored into the matching field of a checkpoint; any other keyword goes to `objects`.
_TOP_LEVEL = ("model", "optimizer", "scheduler")
_ZERO = Position(epoch=0, batch_in_epoch=0, epoch_complete=False, step=0)


@dataclass(frozen=True)
class Start:
    """Where training starts: `parent`, the checkpoint the next commit names as its parent (None:
    nothing to start from); `state`, what to load; `weights_only`, a warm start of the model alone."""

    parent: str | None = None
    state: TrainingState | None = None
    weights_only: bool = False


class Resumer:
    """One rank's checkpoint side: find the start, apply it, capture the state to save, restore RNG."""

    def __init__(self, store: CheckpointStore, lineage: str, settings: TrainSettings, *, rank: int,
                 world_size: int, seed: int):
        self.store, self.lineage, self.settings = store, lineage, settings
        self.rank, self.world_size, self.seed = rank, world_size, seed

    def find(self) -> Start:
        """The lineage's newest good checkpoint, else the warm start (`init_from`), else nothing."""
        manifest, state = newest_good(self.store, self.lineage)
        if manifest is not None:
            if self.rank == 0:
                log.info("resuming %s from %s (epoch %d, batch %d, step %d)", self.lineage, manifest.id,
                         state.position.epoch, state.position.batch_in_epoch, state.position.step)
            return Start(manifest.id, state)
        if self.settings.init_from:
            return self._warm_start()
        return Start()

    def _warm_start(self) -> Start:
        source, selector = self.settings.init_source
        manifest = self.store.resolve(source, selector, verified=True)
        state = decode({name: self.store.read(manifest, name) for name in manifest.files})
        parent = f"{source}/{manifest.id}"
        if self.rank == 0:
            log.info("warm start of %s from %s (%s)", self.lineage, parent, self.settings.init_mode)
        if self.settings.init_mode == "weights":
            return Start(parent, state, weights_only=True)
        # `full`: the whole training state, but a new lineage starts at epoch 0 with fresh counters.
        return Start(parent, TrainingState(model=state.model, optimizer=state.optimizer, scheduler=state.scheduler,
                                           rng=state.rng, extra=state.extra, position=_ZERO))

    def apply(self, start: Start, objects: dict[str, Any], user_state: dict[str, Any]) -> TrainingState | None:
        """Load `start` into the registered objects and `user_state` (in place). Returns the state the
        loop goes on from (its position, metric sums, loader positions, RNG), None to start afresh."""
        state = start.state
        if state is None:
            return None
        objects["model"].load_state_dict(state.model)
        if start.weights_only:
            return None
        for name in ("optimizer", "scheduler"):
            saved = getattr(state, name)
            if name in objects and saved is not None:
                objects[name].load_state_dict(saved)
        extra = state.extra if "objects" in state.extra else {"user": state.extra, "objects": {}, "loaders": []}
        for name, obj in objects.items():
            if name not in _TOP_LEVEL and name in extra["objects"]:
                obj.load_state_dict(_json_keys_back(obj, extra["objects"][name]))
        user_state.clear()
        user_state.update(extra.get("user") or {})
        return state

    def capture(self, objects: dict[str, Any], user_state: dict[str, Any], position: Position,
                ranks: list[dict[str, Any]], progress: dict[str, Any]) -> TrainingState:
        """The state rank 0 saves; `ranks` is what every rank gathered (its RNG, its loader positions)."""
        extra = {"user": user_state,
                 "objects": {k: v.state_dict() for k, v in objects.items() if k not in _TOP_LEVEL},
                 "loaders": [r["loaders"] for r in ranks]}
        return TrainingState(
            model=objects["model"].state_dict(), position=position,
            optimizer=objects["optimizer"].state_dict() if "optimizer" in objects else None,
            scheduler=objects["scheduler"].state_dict() if "scheduler" in objects else None,
            rng=[r["rng"] for r in ranks], progress=progress, extra=extra)

    def loader_states(self, state: TrainingState | None, loaders: int) -> list[Any] | None:
        """This rank's saved positions of its `loaders` ctx.loaders (None: none saved, or left out by a drill)."""
        if state is None or "loaders" not in state.extra:
            return None
        per_rank = state.extra["loaders"]
        if len(per_rank) != self.world_size:
            raise LoopError(f"the checkpoint holds data-loader positions for {len(per_rank)} ranks, this run has "
                            f"{self.world_size}: resume with the same number of workers")
        mine = per_rank[self.rank]
        if len(mine) != loaders:
            raise LoopError(f"the checkpoint holds {len(mine)} ctx.loader position(s), the loop made "
                            f"{loaders}: create the same loaders, in the same order, before ctx.epochs()")
        return None if "loader" in faults.omitted() else mine

    def restore_rng(self, state: TrainingState | None, step: int) -> None:
        """Last thing before the first forward pass: this rank's own RNG state, exactly (else a seed)."""
        if state is not None and len(state.rng) == self.world_size and "rng" not in faults.omitted():
            restore_rng(state.rng[self.rank])
            return
        if state is not None and state.rng and len(state.rng) != self.world_size:
            log.warning("the checkpoint has RNG states for %d ranks, this run has %d: reseeding, so this "
                        "resume is not bit-exact", len(state.rng), self.world_size)
        seed_rank(self.seed, self.rank, step)


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
