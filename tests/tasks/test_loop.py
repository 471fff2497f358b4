"""The ctx API and the built-in loop, in one process (`run_local`): exact resume, loader position,
metrics, errors. No Ray, no server: the distributed versions run in tests/integration."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from ckpt import CheckpointStore
from flows.config import TrainConfig
from tasks.errors import InjectedFailure, LoopError
from tasks.runtime.faults import OMIT_STATE_ENV
from tasks.runtime.worker import run_local


def _train(store: Path, lineage: str, **fields):
    """Run every block of the config in this process, like the flow does; returns the reports."""
    fields.setdefault("workers", 1)
    config = TrainConfig(store=str(store), lineage=lineage, **fields)
    reports: list[dict] = []
    for spec in config.blocks():
        run_local(spec, reports.append)
    return CheckpointStore(str(store)).latest(lineage), reports


def _train_until_failure(store: Path, lineage: str, **fields):
    with pytest.raises(InjectedFailure, match="failure injection"):
        _train(store, lineage, **fields)


def test_the_built_in_loop_split_into_blocks_ends_bit_identical_to_one_block(tmp_path):
    one, _ = _train(tmp_path, "one", recipe="tasks.recipes:digits", epochs=3, epochs_per_block=3)
    split, _ = _train(tmp_path, "split", recipe="tasks.recipes:digits", epochs=3, epochs_per_block=1)
    assert one.digest == split.digest and one.step == split.step == 3 * 45


def test_a_failure_mid_epoch_resumes_at_the_next_unseen_batch_and_every_sample_is_seen_once(tmp_path):
    common = dict(recipe="tasks.recipes:digits", epochs=2, epochs_per_block=2, checkpoint_every_steps=5)
    straight, straight_reports = _train(tmp_path, "straight", **common)
    log = tmp_path / "samples"
    _train_until_failure(tmp_path, "failed", sample_log=str(log), fail={"epoch": 1, "batch": 12}, **common)
    latest = CheckpointStore(str(tmp_path)).latest("failed")
    assert (latest.epoch, latest.position.batch_in_epoch) == (1, 10)  # step 55, the last multiple of 5
    resumed, resumed_reports = _train(tmp_path, "failed", sample_log=str(log), **common)
    assert resumed.digest == straight.digest
    # The resumed epoch's loss covers the batches before the resume too.
    assert resumed_reports[-1]["loss"] == pytest.approx(straight_reports[-1]["loss"], rel=1e-12)
    entries = [json.loads(line) for line in (log / "rank0.jsonl").read_text().splitlines()]
    by_batch = defaultdict(list)
    for entry in entries:
        by_batch[(entry["epoch"], entry["batch"])].append(entry["indices"])
    assert all(all(seen == runs[0] for seen in runs) for runs in by_batch.values())
    for epoch in (0, 1):
        samples = sorted(i for (e, _), runs in by_batch.items() if e == epoch for i in runs[-1])
        assert samples == sorted(set(samples)) and len(samples) == 1440


def test_a_user_loop_with_loader_workers_two_optimizers_and_a_scaler_resumes_bit_identical(tmp_path):
    common = dict(loop="tests.tasks.loops:two_optimizers", epochs=2, epochs_per_block=1, checkpoint_every_steps=6)
    straight, _ = _train(tmp_path, "straight", **common)
    _train_until_failure(tmp_path, "failed", fail={"epoch": 0, "batch": 20}, **common)
    _train_until_failure(tmp_path, "failed", fail={"epoch": 1, "batch": 9}, **common)
    resumed, _ = _train(tmp_path, "failed", **common)
    assert resumed.digest == straight.digest and resumed.step == straight.step == 64


def test_without_the_loader_position_a_mid_epoch_resume_differs(tmp_path, monkeypatch):
    common = dict(loop="tests.tasks.loops:two_optimizers", epochs=1, checkpoint_every_steps=6,
                  options={"num_workers": 0})
    straight, _ = _train(tmp_path, "straight", **common)
    _train_until_failure(tmp_path, "control", fail={"epoch": 0, "batch": 20}, **common)
    monkeypatch.setenv(OMIT_STATE_ENV, "loader")
    control, _ = _train(tmp_path, "control", **common)
    assert control.digest != straight.digest


def test_a_plain_dataloader_cannot_checkpoint_mid_epoch_so_it_resumes_at_the_epoch_start(tmp_path):
    common = dict(loop="tests.tasks.loops:plain_loader", epochs=2, checkpoint_every_steps=4)
    _train_until_failure(tmp_path, "plain", fail={"epoch": 1, "batch": 10}, **common)
    assert [m.position.epoch_complete for m in CheckpointStore(str(tmp_path)).list("plain")] == [True]


def test_a_loop_that_returns_before_its_epochs_are_done_is_an_error_naming_the_fix(tmp_path):
    with pytest.raises(LoopError, match="iterate `for epoch in ctx.epochs"):
        _train(tmp_path, "early", loop="tests.tasks.loops:returns_early", epochs=2)


@pytest.mark.parametrize("loop, message", [
    ("tests.tasks.loops:nothing_here", "has no attribute 'nothing_here'"),
    ("tests.tasks.loops:__doc__", "not a function train_loop"),
    ("no_such_module_x:train", "cannot import module 'no_such_module_x'"),
    ("just-a-name", "is not of the form 'module:attr'"),
])
def test_a_loop_that_cannot_be_imported_is_refused_by_the_config_naming_the_field(loop, message):
    with pytest.raises(ValueError, match=message) as err:
        TrainConfig(loop=loop)
    assert "loop" in str(err.value)


def test_a_non_finite_loss_stops_the_block_and_commits_nothing_from_that_step(tmp_path):
    from tasks.errors import NonFiniteMetric

    with pytest.raises(NonFiniteMetric, match="Lower the learning rate"):
        _train(tmp_path, "diverged", recipe="tasks.recipes:digits", lr=1e30, epochs=2, checkpoint_every_steps=2)
    committed = CheckpointStore(str(tmp_path)).list("diverged")
    assert all(m.metrics.get("loss", 0.0) == m.metrics.get("loss", 0.0) for m in committed)  # no NaN committed
    assert all(abs(v) != float("inf") for m in committed for v in m.metrics.values())


@pytest.mark.parametrize("recipe, message", [
    ("sys:exit", "not a tasks.recipes.Recipe or a function of no arguments"),
    ("os:system", "not a tasks.recipes.Recipe or a function of no arguments"),
    ("shutil:rmtree", "not a tasks.recipes.Recipe or a function of no arguments"),
    ("tests.tasks.broken_recipe:anything", "cannot import module 'tests.tasks.broken_recipe' (ZeroDivisionError"),
])
def test_a_recipe_is_validated_without_calling_arbitrary_callables(recipe, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        TrainConfig(recipe=recipe)


@pytest.mark.parametrize("values, field", [({"epochs": True}, "epochs"), ({"workers": "2"}, "workers"),
                                           ({"lr": "0.1"}, "lr")])
def test_config_types_are_strict(values, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig.model_validate(values)
