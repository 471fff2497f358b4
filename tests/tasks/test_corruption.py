"""Corrupt checkpoints met by training, in one process (`run_local`, no Ray, no server): a damaged
newest checkpoint is repaired by training again, an extension after a corruption trains no step
twice, a checkpoint whose hashes match but which does not load is skipped, and random sequences of
training, corruption, cleanup and kills never lose the newest good checkpoint. Also: every
exception of `tasks` survives the pickling Ray applies to a worker's error."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import json
import logging
import pickle
import pkgutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tasks
from ckpt import CheckpointStore, RetentionPolicy, decode, prune
from ckpt.state import META_FILE, MODEL_FILE, TENSORS_FILE
from flows.config import TrainConfig
from tasks.errors import InjectedFailure
from tasks.runtime.worker import run_local

DIGITS = dict(recipe="tasks.recipes:digits", epochs_per_block=1, checkpoint_every_steps=15)
# The default recipe (a linear model, 8 steps an epoch) for the property test: a few ms an epoch.
LINEAR = dict(epochs_per_block=10, checkpoint_every_steps=3)


def _train(store: Path | str, lineage: str, **fields):
    """Every block of the config in this process, as the flow runs them; the newest checkpoint."""
    config = TrainConfig(store=str(store), lineage=lineage, workers=1, **fields)
    for spec in config.blocks():
        run_local(spec)
    return CheckpointStore(str(store)).latest(lineage)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {"a flipped byte": _flip_a_byte, "a truncated file": _truncate, "a lost file": Path.unlink}


def _file(store: CheckpointStore, lineage: str, ckpt_id: str, name: str) -> Path:
    return Path(store.path(lineage, ckpt_id, name))


def _loads(store: CheckpointStore, lineage: str, ckpt_id: str) -> bool:
    manifest = store.manifest(lineage, ckpt_id)
    decode({name: store.read(manifest, name) for name in manifest.files})
    return True


# ---- a damaged newest checkpoint ---------------------------------------------------------------
@pytest.mark.parametrize("name", [MODEL_FILE, TENSORS_FILE, META_FILE])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_training_again_to_the_same_epochs_repairs_a_damaged_newest_checkpoint(tmp_path, damage, name):
    clean = _train(tmp_path, "clean", epochs=2, **DIGITS)
    newest = _train(tmp_path, "run", epochs=2, **DIGITS)
    store = CheckpointStore(str(tmp_path))
    DAMAGE[damage](_file(store, "run", newest.id, name))
    assert store.verify_lineage("run") != []

    again = _train(tmp_path, "run", epochs=2, **DIGITS)
    assert store.verify_lineage("run") == []
    assert again.id == newest.id and again.digest == clean.digest
    assert _loads(store, "run", again.id)
    assert [m.id for m in store.list("run")] == [m.id for m in store.list("clean")]


def test_extending_the_epochs_after_a_corruption_trains_no_step_twice(tmp_path):
    clean = _train(tmp_path, "clean", epochs=3, **DIGITS)
    newest = _train(tmp_path, "run", epochs=2, **DIGITS)
    store = CheckpointStore(str(tmp_path))
    _flip_a_byte(_file(store, "run", newest.id, MODEL_FILE))

    log = tmp_path / "samples"
    extended = _train(tmp_path, "run", epochs=3, sample_log=str(log), **DIGITS)
    trained = [(e["epoch"], e["batch"]) for e in map(json.loads, (log / "rank0.jsonl").read_text().splitlines())]
    assert len(trained) == len(set(trained))  # no batch trained twice
    # The last 15 steps of epoch 1 again (the damaged checkpoint's), then epoch 2: nothing more.
    assert trained == [(1, b) for b in range(30, 45)] + [(2, b) for b in range(45)]
    assert extended.digest == clean.digest and extended.step == clean.step == 3 * 45
    assert store.verify_lineage("run") == []
    assert [m.id for m in store.list("run")] == [m.id for m in store.list("clean")]


# ---- hashes that match, content that does not load ---------------------------------------------
class _Payload:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _planted(kind: str, marker: Path) -> bytes:
    if kind == "pickle":
        return pickle.dumps(_Payload(marker))
    buffer = io.BytesIO()
    torch.save({"weight": torch.ones(2), "payload": _Payload(marker)}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("name, kind", [(META_FILE, "pickle"), (META_FILE, "torch zip"),
                                        (MODEL_FILE, "torch zip"), (TENSORS_FILE, "pickle")])
def test_a_checkpoint_whose_hashes_match_but_which_does_not_load_is_skipped_then_replaced(tmp_path, caplog,
                                                                                          name, kind):
    clean = _train(tmp_path, "clean", epochs=2, **DIGITS)
    newest = _train(tmp_path, "run", epochs=2, **DIGITS)
    store = CheckpointStore(str(tmp_path))
    marker = tmp_path / "code-ran"
    files = {n: bytes(store.read(newest, n)) for n in newest.files}
    files[name] = _planted(kind, marker)
    store.delete("run", newest.id)
    # A manifest computed for those bytes by the store's own commit: every hash matches.
    planted = store.commit("run", newest.position, files, metrics=newest.metrics,
                           digest=hashlib.sha256(files[MODEL_FILE]).hexdigest())
    assert store.verify(planted) == [] and store.verify_lineage("run") == []

    with caplog.at_level(logging.WARNING):
        again = _train(tmp_path, "run", epochs=2, **DIGITS)
    assert f"skipping checkpoint run/{newest.id}, which cannot be loaded" in caplog.text
    assert not marker.exists()  # nothing was unpickled
    assert again.id == newest.id and again.digest == clean.digest
    assert _loads(store, "run", again.id) and store.verify_lineage("run") == []


# ---- random sequences of training, corruption, cleanup and kills -------------------------------
_CLEAN: dict[int, str] = {}


def _clean_digest(root: Path, epochs: int) -> str:
    if epochs not in _CLEAN:
        _CLEAN[epochs] = _train(root / "clean", f"clean-{epochs}", epochs=epochs, **LINEAR).digest
    return _CLEAN[epochs]


policies = st.builds(RetentionPolicy, keep_last=st.none() | st.integers(1, 3),
                     keep_best=st.none() | st.integers(1, 2), keep_every=st.none() | st.integers(1, 2))
steps = st.lists(st.one_of(
    st.tuples(st.just("train"), st.integers(1, 2)),
    st.tuples(st.just("corrupt"), st.integers(0, 99), st.sampled_from([MODEL_FILE, TENSORS_FILE, META_FILE]),
              st.sampled_from(sorted(DAMAGE))),
    st.tuples(st.just("cleanup"), policies),
    st.tuples(st.just("kill"), st.integers(0, 99), st.integers(0, 7)),
), min_size=1, max_size=7)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=steps)
def test_training_corruption_cleanup_and_kills_in_any_order_never_lose_the_newest_good_checkpoint(
        tmp_path_factory, steps):
    root = tmp_path_factory.mktemp("property")
    store, lineage, epochs = CheckpointStore(str(root / "store")), "run", 0
    for step in steps:
        if step[0] == "train":
            epochs = min(epochs + step[1], 5)
            _train(store.url, lineage, epochs=epochs, **LINEAR)
        elif step[0] == "kill":
            # Fails before a batch of an epoch this run trains (if it resumes before that batch).
            epochs = min(epochs + 1, 5)
            fail = {"epoch": step[1] % epochs, "batch": step[2]}
            try:
                _train(store.url, lineage, epochs=epochs, fail=fail, **LINEAR)
            except InjectedFailure as err:
                assert "failure injection" in str(err)
        elif step[0] == "corrupt" and (committed := store.list(lineage)):
            path = _file(store, lineage, committed[step[1] % len(committed)].id, step[2])
            if path.exists():  # not already lost
                DAMAGE[step[3]](path)
        elif step[0] == "cleanup":
            good = store.latest_verified(lineage)
            count = len(store.list(lineage))
            prune(store, step[1], lineage)
            if good is not None:
                assert good.id in [m.id for m in store.list(lineage)] and store.verify(good) == []
                assert store.latest_verified(lineage).id == good.id
            assert bool(store.list(lineage)) == bool(count)  # a lineage is never emptied

    final = _train(store.url, lineage, epochs=max(epochs, 1), **LINEAR)
    assert store.verify(final) == [] and _loads(store, lineage, final.id)
    assert final.digest == _clean_digest(root, max(epochs, 1))
    # Damaged checkpoints that training did not reach again go with the next cleanup.
    prune(store, RetentionPolicy(keep_last=2), lineage)
    assert store.verify_lineage(lineage) == []
    assert store.latest_verified(lineage).id == final.id


# ---- errors across Ray -------------------------------------------------------------------------
def _task_errors() -> list[type]:
    for module in pkgutil.walk_packages(tasks.__path__, "tasks."):
        importlib.import_module(module.name)
    found, todo = set(), [Exception]
    while todo:
        for cls in todo.pop().__subclasses__():
            todo.append(cls)
            if cls.__module__.startswith("tasks."):
                found.add(cls)
    return sorted(found, key=lambda c: (c.__module__, c.__name__))


def test_the_named_exception_classes_of_tasks_are_all_found():
    names = {f"{c.__module__}.{c.__name__}" for c in _task_errors()}
    assert {"tasks.runtime.errors.LoopError", "tasks.runtime.errors.NonFiniteMetric",
            "tasks.runtime.errors.LoopNotFound", "tasks.errors.NotEnoughResources",
            "tasks.runtime.errors.RecipeError", "tasks.runtime.errors.Preempted", "tasks.errors.GroupLost"} <= names


def test_every_exception_class_of_tasks_has_one_root():
    from tasks.errors import TaskError

    strays = [f"{c.__module__}.{c.__name__}" for c in _task_errors() if not issubclass(c, TaskError)]
    assert strays == []


@pytest.mark.parametrize("cls", _task_errors(), ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_exception_of_tasks_survives_pickling_with_its_message(cls):
    params = [p for p in inspect.signature(cls.__init__).parameters.values()
              if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.default is p.empty]
    message = f"{cls.__name__}: what went wrong, and what to do next"
    error = cls(message, *[f"<{p.name}>" for p in params[1:]]) if params else cls(message)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is cls and str(again) == str(error) and again.args == error.args
