"""The Resumer on its own (tasks/runtime/resume.py), against a real store in a temporary folder:
what it captures comes back through a committed checkpoint into fresh objects, where a block starts
(nothing, the newest checkpoint, a warm start), loader positions, and every rank's RNG."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from torch import nn

from ckpt import CheckpointStore, Position, capture_rng
from tasks.errors import LoopError
from tasks.recipes import RecipeParams
from tasks.runtime.commit import Committer
from tasks.runtime.resume import Resumer
from tasks.runtime.settings import TrainSettings
from tasks.runtime.spec import BlockSpec

MID_EPOCH = Position(epoch=1, batch_in_epoch=3, epoch_complete=False, step=7)


def _objects(seed: int) -> dict:
    torch.manual_seed(seed)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()  # momentum buffers: optimizer state worth restoring
    ema = nn.Linear(4, 2)
    return {"model": model, "optimizer": optimizer, "ema": ema}


def _resumer(store: CheckpointStore, lineage: str, **settings) -> Resumer:
    return Resumer(store, lineage, TrainSettings(store=store.root, **settings), rank=0, world_size=1, seed=3)


def _commit(store: CheckpointStore, lineage: str, objects: dict, position: Position = MID_EPOCH,
            user: dict | None = None) -> str:
    resumer = _resumer(store, lineage)
    ranks = [{"rng": capture_rng(), "loaders": [{"epoch": 1, "batches_done": 3}]}]
    state = resumer.capture(objects, user or {"seen": 21}, position, ranks,
                            {"sums": {"loss": 2.5}, "counts": {"loss": 3.0}})
    block = BlockSpec(index=0, lineage=lineage, start_epoch=0, end_epoch=2, settings=TrainSettings(store=store.root),
                      params=RecipeParams(lr=0.1, batch_size=4, epochs=2))
    committer = Committer(store, lineage, background=False)
    assert committer.commit(state, {"loss": 0.8}, block) is None
    return committer.parent


@pytest.fixture
def store(tmp_path) -> CheckpointStore:
    return CheckpointStore(str(tmp_path))


def test_a_lineage_with_no_checkpoint_and_no_warm_start_starts_from_nothing(store):
    start = _resumer(store, "new").find()
    objects = _objects(0)
    before = objects["model"].weight.clone()
    assert (start.parent, start.state) == (None, None)
    assert _resumer(store, "new").apply(start, objects, {"x": 1}) is None
    assert torch.equal(objects["model"].weight, before)


def test_what_it_captures_comes_back_from_the_committed_checkpoint_into_fresh_objects(store):
    saved = _objects(0)
    checkpoint = _commit(store, "run", saved)
    fresh, user = _objects(1), {"seen": 0}
    start = _resumer(store, "run").find()
    state = _resumer(store, "run").apply(start, fresh, user)
    assert start.parent == checkpoint and not start.weights_only
    assert state.position == MID_EPOCH and state.progress == {"sums": {"loss": 2.5}, "counts": {"loss": 3.0}}
    assert user == {"seen": 21}
    for name in ("model", "ema"):
        for got, want in zip(fresh[name].state_dict().values(), saved[name].state_dict().values()):
            assert torch.equal(got, want)
    momentum = fresh["optimizer"].state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, saved["optimizer"].state_dict()["state"][0]["momentum_buffer"])


def test_a_weights_warm_start_loads_the_model_only_and_names_the_source_as_parent(store):
    saved = _objects(0)
    checkpoint = _commit(store, "source", saved)
    fresh = _objects(1)
    momentum = fresh["optimizer"].state_dict()["state"][0]["momentum_buffer"].clone()
    resumer = _resumer(store, "child", init_from="source", init_mode="weights")
    start = resumer.find()
    assert start.parent == f"source/{checkpoint}" and start.weights_only
    assert resumer.apply(start, fresh, {}) is None  # the loop starts at epoch 0 with fresh counters
    assert torch.equal(fresh["model"].weight, saved["model"].weight)
    assert torch.equal(fresh["optimizer"].state_dict()["state"][0]["momentum_buffer"], momentum)


def test_a_full_warm_start_loads_everything_but_starts_at_epoch_zero(store):
    saved = _objects(0)
    _commit(store, "source", saved)
    fresh = _objects(1)
    resumer = _resumer(store, "child", init_from="source@latest", init_mode="full")
    state = resumer.apply(resumer.find(), fresh, {})
    assert state.position == Position(epoch=0, batch_in_epoch=0, epoch_complete=False, step=0)
    assert torch.equal(fresh["ema"].weight, saved["ema"].weight)


def test_loader_positions_from_another_world_size_or_loader_count_are_refused_naming_the_fix(store):
    _commit(store, "run", _objects(0))
    state = _resumer(store, "run").find().state
    assert _resumer(store, "run").loader_states(state, 1) == [{"epoch": 1, "batches_done": 3}]
    with pytest.raises(LoopError, match="create the same loaders, in the same order"):
        _resumer(store, "run").loader_states(state, 2)
    two_ranks = Resumer(store, "run", TrainSettings(store=store.root), rank=1, world_size=2, seed=3)
    with pytest.raises(LoopError, match="resume with the same number of workers"):
        two_ranks.loader_states(state, 1)
    assert _resumer(store, "run").loader_states(None, 1) is None


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_restore_rng_gives_back_this_ranks_exact_state_and_otherwise_reseeds_with_a_warning(store, caplog):
    _commit(store, "run", _objects(0))  # captures the RNG state of this moment
    expected = _draws()
    state = _resumer(store, "run").find().state
    _draws()
    _resumer(store, "run").restore_rng(state, step=7)
    assert _draws() == expected
    other = Resumer(store, "run", TrainSettings(store=store.root), rank=0, world_size=2, seed=3)
    with caplog.at_level(logging.WARNING):
        other.restore_rng(state, step=7)
    reseeded = _draws()
    other.restore_rng(None, step=7)
    assert _draws() == reseeded != expected
    assert "RNG states for 1 ranks, this run has 2: reseeding" in caplog.text
