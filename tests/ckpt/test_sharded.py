"""The multi-writer commit (ckpt/sharded.py) on every backend: each rank writes its own part, rank 0
commits one manifest last; failed ranks leave leftovers, never checkpoints; verify, repair, retention
and the fence work on sharded checkpoints as on single-writer ones. Ranks are called in one process
here: the API is the same from any process (tests/ckpt/test_dcp.py runs real ranks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ckpt import (
    CheckpointCorrupted,
    CheckpointExists,
    CheckpointStore,
    InvalidArgument,
    Lease,
    LeaseLost,
    Position,
    RetentionPolicy,
    prune,
)
from ckpt.manifest import MANIFEST_NAME, Manifest, decode_manifest, encode_manifest
from ckpt.sharded import IncompletePart, Part, parts_digest, rank_files

from .conftest import SHARED_BACKENDS
from .test_store import ROOT, read_raw, write_raw

POSITION = Position(epoch=1, batch_in_epoch=3, epoch_complete=False, step=7)
CKPT_ID = "000001-0000000007"


def rank_bytes(rank: int, seed: int = 0, size: int = 3000) -> bytes:
    return bytes((rank * 31 + seed * 7 + i) % 251 for i in range(size))


def write_all(store: CheckpointStore, world: int = 2, seed: int = 0, lineage: str = "run") -> list[Part]:
    return [store.write_part(lineage, CKPT_ID, rank, {"data.distcp": rank_bytes(rank, seed), "rng.json": b"{}"})
            for rank in range(world)]


def test_parts_of_every_rank_commit_as_one_checkpoint_that_lists_each_ranks_files(store):
    parts = write_all(store, world=3)
    assert store.list("run") == []  # written, not committed
    manifest = store.commit_parts("run", POSITION, parts, metrics={"loss": 0.5})

    assert manifest.version == 4 and manifest.id == CKPT_ID and store.list("run") == [manifest]
    assert {name: entry.rank for name, entry in manifest.files.items()} == {
        f"rank-0000{r}.{n}": r for r in range(3) for n in ("data.distcp", "rng.json")}
    assert rank_files(manifest)[2] == {"data.distcp": "rank-00002.data.distcp", "rng.json": "rank-00002.rng.json"}
    assert store.verify(manifest) == [] and manifest.digest == parts_digest(manifest.files)
    assert bytes(store.read(manifest, "rank-00001.data.distcp")) == rank_bytes(1)
    assert store.resolve("run", "latest", verified=True) == manifest


def test_a_rank_that_failed_leaves_an_uncommitted_leftover_that_cleanup_removes(tmp_path):
    store = CheckpointStore(str(tmp_path / "store"))
    only_rank0 = store.write_part("run", CKPT_ID, 0, {"data.distcp": rank_bytes(0)})
    # Rank 1 died: its part never reached rank 0, so rank 0 never commits. Nothing is a checkpoint.
    assert store.list("run") == [] and set(store.uncommitted("run")) == {CKPT_ID}
    assert only_rank0.files  # what rank 0 wrote is only a leftover
    folder = store.path("run", CKPT_ID)
    for name in os.listdir(folder):
        os.utime(os.path.join(folder, name), (time.time() - 3600,) * 2)
    result = prune(store, RetentionPolicy(keep_last=1, uncommitted_ttl="1m"))
    assert [d.id for d in result.deleted] == [CKPT_ID] and not os.path.exists(folder)


def test_a_part_whose_file_is_gone_is_refused_and_nothing_is_committed(store):
    parts = write_all(store)
    store.fs.rm_file(store.path("run", CKPT_ID, "rank-00001.data.distcp"))
    with pytest.raises(IncompletePart, match="rank-00001.data.distcp: missing"):
        store.commit_parts("run", POSITION, parts)
    assert store.list("run") == []


def test_parts_of_another_checkpoint_or_two_parts_of_one_rank_are_refused(store):
    parts = write_all(store)
    other = store.write_part("run", "000002-0000000009", 1, {"data.distcp": b"x"})
    with pytest.raises(InvalidArgument, match="written for run/000002-0000000009"):
        store.commit_parts("run", POSITION, [parts[0], other])
    with pytest.raises(InvalidArgument, match="two parts hold"):
        store.commit_parts("run", POSITION, [parts[0], parts[0], parts[1]])
    assert store.list("run") == []


def test_a_writer_whose_lease_was_taken_over_cannot_commit_its_parts(store):
    first = Lease(store, "run", owner="old", ttl_s=60)
    fence = first.acquire()
    first.release()
    Lease(store, "run", owner="new", ttl_s=60).acquire()
    with pytest.raises(LeaseLost, match="taken over"):
        store.commit_parts("run", POSITION, write_all(store), fence=fence,
                           before_commit=lambda: Lease.check(store, "run", fence))
    assert store.list("run") == []


def test_committing_the_same_parts_again_keeps_the_checkpoint_and_never_overwrites_its_files(store):
    committed = store.commit_parts("run", POSITION, write_all(store))
    before = read_raw(store, store.path("run", CKPT_ID, "rank-00000.data.distcp"))
    again = write_all(store)  # a re-run after a commit whose report was lost
    assert all(name not in committed.files for part in again for name in part.files)
    assert store.commit_parts("run", POSITION, again) == committed
    assert read_raw(store, store.path("run", CKPT_ID, "rank-00000.data.distcp")) == before
    left = {p.rsplit("/", 1)[-1] for p in store.fs.find(store.path("run", CKPT_ID))}
    assert left == set(committed.files) | {MANIFEST_NAME}  # the new copies are gone

    with pytest.raises(CheckpointExists):
        store.commit_parts("run", POSITION, write_all(store, seed=1))
    assert store.verify(store.manifest("run", CKPT_ID)) == []


def test_a_flipped_byte_in_one_ranks_file_is_named_and_the_next_commit_repairs_it(store):
    store.commit_parts("run", POSITION, write_all(store))
    path = store.path("run", CKPT_ID, "rank-00001.data.distcp")
    damaged = bytearray(read_raw(store, path))
    damaged[100] ^= 0xFF
    write_raw(store, path, bytes(damaged))
    assert store.verify(store.manifest("run", CKPT_ID))[0].startswith("rank-00001.data.distcp: blake3")
    assert store.verify_lineage("run") and store.latest_verified("run") is None

    repaired = store.commit_parts("run", POSITION, write_all(store))
    assert store.verify(repaired) == [] and bytes(store.read(repaired, rank_files(repaired)[1]["data.distcp"])) == rank_bytes(1)
    left = {p.rsplit("/", 1)[-1] for p in store.fs.find(store.path("run", CKPT_ID))}
    assert left == set(repaired.files) | {MANIFEST_NAME}  # the damaged files went with the old manifest


def test_a_checkpoint_whose_files_verify_but_do_not_load_is_replaced(store):
    store.commit_parts("run", POSITION, write_all(store))
    replaced = store.commit_parts("run", POSITION, write_all(store),
                                  load_problems=lambda existing: ["metadata is a pickle"])
    assert store.verify(replaced) == [] and all("-" in name.split(".")[0][5:] for name in replaced.files)


def test_retention_keeps_the_latest_sharded_checkpoint_and_removes_older_ones_whole(store):
    for epoch in range(3):
        position = Position(epoch=epoch, batch_in_epoch=0, epoch_complete=True, step=10 * epoch)
        ckpt_id = f"{epoch:06d}-{10 * epoch:010d}"
        parts = [store.write_part("run", ckpt_id, r, {"data.distcp": rank_bytes(r, epoch)}) for r in range(2)]
        store.commit_parts("run", position, parts)
    result = prune(store, RetentionPolicy(keep_last=1))
    assert len(result.deleted) == 2 and [m.epoch for m in store.list("run")] == [2]
    assert store.uncommitted("run") == {}


def test_a_schema_3_manifest_without_ranks_still_loads(store):
    manifest = store.commit_parts("run", POSITION, write_all(store))
    old = manifest.model_copy(update={"version": 3, "files": {n: e.model_copy(update={"rank": None})
                                                              for n, e in manifest.files.items()}})
    assert "\"rank\":" not in encode_manifest(old).decode()
    again = decode_manifest(encode_manifest(old), "here")
    assert isinstance(again, Manifest) and again.version == 3 and store.verify(again) == []


def test_reading_a_missing_part_file_of_a_committed_checkpoint_names_it(store):
    manifest = store.commit_parts("run", POSITION, write_all(store))
    store.fs.rm_file(store.path("run", CKPT_ID, "rank-00000.rng.json"))
    with pytest.raises(CheckpointCorrupted, match="rank-00000.rng.json: missing"):
        store.read(manifest, "rank-00000.rng.json")


KILLED_WRITER = """
import os, sys
from ckpt import CheckpointStore, Position
store = CheckpointStore(sys.argv[1])
before = Position(epoch=0, batch_in_epoch=0, epoch_complete=True, step=3)
store.commit_parts("run", before, [store.write_part("run", "000000-0000000003", r, {"data.distcp": b"old"}) for r in range(2)])
parts = [store.write_part("run", sys.argv[2], 0, {"data.distcp": bytes(1000)})]
os.write(1, b"writing\\n")
parts.append(store.write_part("run", sys.argv[2], 1, {"data.distcp": bytes(128 * 2**20)}))
store.commit_parts("run", Position(epoch=1, batch_in_epoch=3, epoch_complete=False, step=7), parts)
os.write(1, b"committed\\n")
"""


@pytest.mark.slow
@pytest.mark.parametrize("store_url", SHARED_BACKENDS, indirect=True)
def test_a_rank_killed_while_writing_its_part_leaves_no_checkpoint_and_the_previous_one_whole(store_url):
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, store_url, CKPT_ID], stdout=subprocess.PIPE,
                             cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout.readline() == b"writing\n"
        time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        rest = child.communicate()[0]
    assert b"committed" not in rest, "the write finished before the kill: make the part larger"
    store = CheckpointStore(store_url)  # as another process: nothing cached
    assert [m.id for m in store.list("run")] == ["000000-0000000003"]
    assert store.verify_lineage("run") == [] and store.latest_verified("run").id == "000000-0000000003"
    assert CKPT_ID in store.uncommitted("run")
