"""Asynchronous saves (ckpt.async_save): same checkpoints as sync saves, a snapshot that training
cannot change, one save in flight, and failures that surface on the next save."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from ckpt import CheckpointStore, Position, TrainingState, capture_rng, checkpoint_id, decode, encode
from ckpt.async_save import AsyncSaveFailed, AsyncSaver


def _trainer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, optimizer


def _step(model, optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(8, 64)).pow(2).mean().backward()
    optimizer.step()


def _state(model, optimizer, step: int) -> TrainingState:
    return TrainingState(model=model.state_dict(), optimizer=optimizer.state_dict(), rng=[capture_rng()],
                         position=Position(epoch=0, batch_in_epoch=step, epoch_complete=False, step=step),
                         progress={"loss_sum": 1.5, "batches": float(step)},
                         extra={"ema": model[0].weight})  # aliases a live parameter on purpose


def _commit(store: CheckpointStore, lineage: str):
    def commit(state: TrainingState):
        files = encode(state)
        return store.commit(lineage, state.position, files, metrics={"loss": 0.5})
    return commit


def _files(store: CheckpointStore, manifest) -> dict[str, bytes]:
    return {name: store.read(manifest, name) for name in manifest.files}


def test_async_and_sync_saves_of_the_same_state_commit_identical_checkpoints(tmp_path: Path):
    model, optimizer = _trainer()
    _step(model, optimizer)
    sync_store, async_store = CheckpointStore(str(tmp_path / "sync")), CheckpointStore(str(tmp_path / "async"))
    state = _state(model, optimizer, step=1)
    sync = _commit(sync_store, "run")(state)
    with AsyncSaver() as saver:
        saver.save(state, _commit(async_store, "run"))
        done = saver.wait()
    assert done.digest == sync.digest
    assert {n: (e.sha256, e.size) for n, e in done.files.items()} == {n: (e.sha256, e.size) for n, e in sync.files.items()}
    assert _files(async_store, done) == _files(sync_store, sync)


def test_training_after_an_async_save_starts_does_not_change_the_checkpoint(tmp_path: Path):
    model, optimizer = _trainer()
    _step(model, optimizer)
    expected = {name: bytes(blob) for name, blob in encode(_state(model, optimizer, step=1)).items()}  # a copy
    store, release = CheckpointStore(str(tmp_path)), threading.Event()
    commit = _commit(store, "run")
    with AsyncSaver() as saver:
        saver.save(_state(model, optimizer, step=1), lambda s: (release.wait(), commit(s))[1])
        for _ in range(3):  # training goes on while the save has not even started writing
            _step(model, optimizer)
        release.set()
        manifest = saver.wait()
    assert _files(store, manifest) == expected
    assert not torch.equal(decode(_files(store, manifest)).model["0.weight"], model[0].weight.detach())


def test_staging_buffers_are_reused_from_one_save_to_the_next(tmp_path: Path):
    model, optimizer = _trainer()
    _step(model, optimizer)
    store = CheckpointStore(str(tmp_path))
    with AsyncSaver() as saver:
        saver.save(_state(model, optimizer, step=1), _commit(store, "run"))
        buffers = {k: v.data_ptr() for k, v in saver.staging._buffers.items()}
        _step(model, optimizer)
        saver.save(_state(model, optimizer, step=2), _commit(store, "run"))
        assert {k: v.data_ptr() for k, v in saver.staging._buffers.items()} == buffers
    assert [m.step for m in store.list("run")] == [1, 2]


def test_a_large_state_is_snapshotted_in_pieces_on_several_threads_exactly():
    from ckpt.async_save import _PIECE, StagingBuffers

    big = torch.randn(5 * _PIECE // 4 + 3)  # five pieces and a ragged end
    strided = torch.randn(64, 64).t()  # not contiguous: copied whole
    position = Position(epoch=0, batch_in_epoch=1, epoch_complete=False, step=1)
    state = TrainingState(model={"big": big, "strided": strided}, position=position,
                          optimizer={"state": {0: {"momentum_buffer": big * 2}}, "param_groups": [{"lr": 0.1}]})
    expected = {name: bytes(blob) for name, blob in encode(state).items()}
    snapshot = StagingBuffers().snapshot(state)
    big.add_(1.0)  # training goes on: the snapshot must not see it
    strided.mul_(3.0)
    assert {name: bytes(blob) for name, blob in encode(snapshot).items()} == expected


def test_the_next_save_waits_for_the_one_in_flight(tmp_path: Path):
    order: list[str] = []

    def slow(name: str):
        def commit(_state):
            time.sleep(0.3)
            order.append(name)
            return name
        return commit

    model, optimizer = _trainer()
    state = _state(model, optimizer, step=1)
    saver: AsyncSaver[str] = AsyncSaver()
    saver.save(state, slow("first"))
    assert saver.in_flight
    started = time.perf_counter()
    assert saver.save(state, slow("second")) == "first"  # returns the previous save's result
    assert time.perf_counter() - started >= 0.2 and order == ["first"]
    assert saver.close() == "second" and order == ["first", "second"]


def _blocked_save(tmp_path: Path):
    """A store whose next checkpoint cannot be written: a plain file sits where its folder must go."""
    model, optimizer = _trainer()
    store = CheckpointStore(str(tmp_path))
    first = _commit(store, "run")(_state(model, optimizer, step=1))
    _step(model, optimizer)
    Path(store.path("run", checkpoint_id(0, 2))).write_bytes(b"not a folder")
    return store, first, _state(model, optimizer, step=2)


def test_a_failed_background_save_fails_the_next_save_and_keeps_the_previous_checkpoint(tmp_path: Path):
    store, first, state = _blocked_save(tmp_path)
    saver = AsyncSaver()
    saver.save(state, _commit(store, "run"), label=checkpoint_id(0, 2))  # returns at once: the write fails later
    with pytest.raises(AsyncSaveFailed, match=checkpoint_id(0, 2)) as failure:
        saver.save(state, _commit(store, "run"))
    assert isinstance(failure.value.__cause__, OSError)
    assert [m.id for m in store.list("run")] == [first.id]
    assert store.verify(first) == []
    assert saver.wait() is None  # the failure was raised once; the save that raised it never started


def test_a_failed_background_save_fails_the_final_wait(tmp_path: Path):
    store, _, state = _blocked_save(tmp_path)
    with pytest.raises(AsyncSaveFailed):
        with AsyncSaver() as saver:
            saver.save(state, _commit(store, "run"))


@pytest.fixture
def full_disk(tmp_path: Path):
    """A real 4 MiB tmpfs, so a save runs out of space (ENOSPC); needs root (mount)."""
    mount = tmp_path / "small"
    mount.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_save_that_runs_out_of_disk_space_mid_write_is_not_committed(full_disk: Path):
    store = CheckpointStore(str(full_disk))
    small, optimizer = _trainer()
    first = _commit(store, "run")(_state(small, optimizer, step=1))
    big = TrainingState(model={"w": torch.zeros(2 * 2**20)}, position=Position(epoch=0, batch_in_epoch=2,
                        epoch_complete=False, step=2))  # 8 MiB: more than the disk holds
    saver = AsyncSaver()
    saver.save(big, _commit(store, "run"), label="big")
    with pytest.raises(AsyncSaveFailed) as failure:
        saver.wait()
    assert isinstance(failure.value.__cause__, OSError) and failure.value.__cause__.errno == 28  # ENOSPC
    assert [m.id for m in store.list("run")] == [first.id] and store.verify(first) == []
    os.sync()
