"""What failed or interrupted writes and deletions leave behind, and the cleanup that removes it:
temporary files of atomic writes (anywhere in a lineage, committed folders too) and deletions that
race with each other."""

from __future__ import annotations

import os
import time

import pytest

from ckpt import CheckpointStore, InvalidArgument, Lease, RetentionPolicy, faults, prune
from ckpt._io import temp_name, write_atomic

from .test_store import commit


def plant_temp(folder: str, name: str, age_s: float) -> str:
    """An empty temporary file, as a write_atomic that failed (disk full) or was killed leaves one."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, temp_name(name))
    open(path, "wb").close()
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


@pytest.fixture
def disk(tmp_path) -> CheckpointStore:
    return CheckpointStore(str(tmp_path / "store"))


def test_old_temp_files_are_swept_from_committed_folders_aliases_and_leases_and_young_ones_kept(disk):
    older = commit(disk, "run", 0, 1)
    newer = commit(disk, "run", 1, 2)
    disk.pin("run", older.id, "production")
    old = [plant_temp(disk.path("run", older.id), "manifest.json", 7200),
           plant_temp(disk.path("run", newer.id), "manifest.json", 7200),
           plant_temp(disk.path("run", "_aliases"), "production.json", 7200),
           plant_temp(disk.path("run", "_lease"), "current.json", 7200)]
    young = plant_temp(disk.path("run", newer.id), "manifest.json", 5)

    result = prune(disk, RetentionPolicy(keep_last=2))

    assert [p for p in old if os.path.exists(p)] == [] and os.path.exists(young)
    assert {d.id.rsplit("/", 1)[-1] for d in result.deleted} == {os.path.basename(p) for p in old}
    assert all(d.kind == "temp" for d in result.deleted)
    assert [m.id for m in disk.list("run")] == [older.id, newer.id] and disk.verify_lineage("run") == []
    assert disk.aliases("run") == {"production": older.id}


def test_temp_files_inside_a_leftover_folder_go_with_the_folder(disk):
    commit(disk, "run", 0, 1)
    leftover = disk.path("run", "000005-0000000050")
    path = plant_temp(leftover, "manifest.json", 7200)
    os.utime(leftover, (time.time() - 7200, time.time() - 7200))
    result = prune(disk, RetentionPolicy(keep_last=1))
    assert [(d.id, d.kind) for d in result.deleted] == [("000005-0000000050", "leftover")]
    assert not os.path.exists(path) and not os.path.exists(leftover)


def test_a_successful_atomic_write_leaves_no_temp_file(disk):
    folder = disk.path("run", "_aliases")
    write_atomic(disk.fs, f"{folder}/x.json", b"{}")
    assert os.listdir(folder) == ["x.json"]


def test_remove_temp_file_refuses_anything_but_a_temp_file(disk):
    manifest = commit(disk, "run", 0, 1)
    for relative in (f"{manifest.id}/manifest.json", f"../other/{temp_name('x')}", "model.safetensors"):
        with pytest.raises(InvalidArgument):
            disk.remove_temp_file("run", relative)
    assert disk.verify(manifest) == []


def test_a_deletion_finished_by_another_deleter_meanwhile_is_not_an_error(store):
    keep = commit(store, "run", 0, 1)
    gone = commit(store, "run", 1, 2)
    other = CheckpointStore(store.url)  # another cleanup, racing this one

    with faults.inject("delete.after_uncommit", lambda: other.delete("run", gone.id)):
        store.delete("run", gone.id)
    assert store.list("run") == [keep] and store.uncommitted("run") == {}
    assert store.delete("run", gone.id) == 0


def test_removing_a_leftover_that_was_committed_meanwhile_keeps_it(store):
    manifest = commit(store, "run", 0, 1)
    assert store.remove_leftover("run", manifest.id) == 0
    assert store.verify(manifest) == []


def test_a_live_writers_leftover_between_the_latest_good_and_a_damaged_newest_is_kept(disk):
    """The writer resumes from the latest good checkpoint and saves the ids after it, which may sort
    before a damaged newer one."""
    commit(disk, "run", 0, 10)
    damaged = commit(disk, "run", 3, 40)
    with open(disk.path("run", damaged.id, "model.safetensors"), "r+b") as handle:
        handle.write(b"\x00\x00\x00")
    saving = disk.path("run", "000001-0000000020")  # files older than the ttl: a slow save, a paused writer
    os.makedirs(saving)
    with open(os.path.join(saving, "model.safetensors"), "wb") as handle:
        handle.write(b"x" * 64)
    os.utime(os.path.join(saving, "model.safetensors"), (time.time() - 7200, time.time() - 7200))
    lease = Lease(disk, "run")
    lease.acquire()
    try:
        prune(disk, RetentionPolicy(keep_last=1))
    finally:
        lease.release()
    assert os.path.exists(saving)
