"""The checkpoint store on three real backends: a local folder, fsspec's memory filesystem and the
local S3 server (Ceph RGW). One suite, run on each; then crash safety with a SIGKILLed writer."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from ckpt import (
    CheckpointCorrupted,
    CheckpointExists,
    CheckpointNotFound,
    CheckpointStore,
    InvalidName,
    Lease,
    Position,
    TrainingState,
    capture_rng,
    checkpoint_id,
    decode,
    encode,
)
from ckpt.manifest import MANIFEST_NAME
from ckpt.state import META_FILE, MODEL_FILE, TENSORS_FILE

from .conftest import SHARED_BACKENDS

WRITER = Path(__file__).with_name("_writer.py")
ROOT = Path(__file__).resolve().parents[2]


# ---- helpers ---------------------------------------------------------------------------------
def position(epoch: int, step: int, batch: int = 0, complete: bool = True) -> Position:
    return Position(epoch=epoch, batch_in_epoch=batch, epoch_complete=complete, step=step)


def training_files(epoch: int, step: int, seed: int = 0, width: int = 8):
    """The real files of a tiny model with SGD momentum: ({name: bytes}, digest, position)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(width, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()
    pos = position(epoch, step)
    files = encode(TrainingState(model=model.state_dict(), position=pos, optimizer=optimizer.state_dict(),
                                         rng=[capture_rng()], progress={"batches": 3.0}))
    digest = files.digest
    return files, digest, pos


def commit(store: CheckpointStore, lineage: str, epoch: int, step: int, seed: int | None = None, **kwargs):
    files, digest, pos = training_files(epoch, step, seed=epoch * 1000 + step if seed is None else seed)
    return store.commit(lineage, pos, files, digest=digest, **kwargs)


def ids(manifests) -> list[str]:
    return [m.id for m in manifests]


def file_path(store: CheckpointStore, lineage: str, ckpt_id: str, name: str) -> str:
    return store.path(lineage, ckpt_id, name)


def read_raw(store: CheckpointStore, path: str) -> bytes:
    return store.fs.cat_file(path)


def write_raw(store: CheckpointStore, path: str, data: bytes) -> None:
    store.fs.pipe_file(path, bytes(data))


def flip_middle_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]


def truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


# ---- committing and querying -----------------------------------------------------------------
def test_committed_checkpoints_are_found_by_list_latest_best_alias_and_id(store):
    first = commit(store, "run", 0, 10, metrics={"loss": 0.9, "acc": 0.50})
    middle = commit(store, "run", 1, 20, metrics={"loss": 0.2, "acc": 0.70})
    last = commit(store, "run", 2, 30, metrics={"loss": 0.4, "acc": 0.95})

    assert ids(store.list("run")) == [first.id, middle.id, last.id]
    assert store.latest("run").id == last.id
    assert store.best("run").id == middle.id
    assert store.best("run", "acc", "max").id == last.id
    assert store.best("run", "acc", "min").id == first.id
    assert store.resolve("run").id == last.id
    assert store.resolve("run", "latest").id == last.id
    assert store.resolve("run", "best").id == middle.id
    assert store.resolve("run", "best", metric="acc", mode="max").id == last.id
    assert store.resolve("run", first.id) == first
    store.pin("run", first.id, "production")
    assert store.resolve("run", "production").id == first.id
    assert store.ref(last).uri == f"{store.url.rstrip('/')}/run/{last.id}"


def test_a_committed_manifest_records_position_metrics_size_and_digest_of_every_file(store):
    files, digest, pos = training_files(3, 77)
    manifest = store.commit("run", pos, files, digest=digest, metrics={"loss": 0.5}, parent="000002-0000000050",
                            config_hash="c" * 64, fence=4)
    again = store.manifest("run", manifest.id)
    assert again == manifest
    assert again.position == pos and again.id == checkpoint_id(3, 77) == "000003-0000000077"
    assert again.metrics == {"loss": 0.5} and again.fence == 4 and again.parent == "000002-0000000050"
    assert {name: entry.size for name, entry in again.files.items()} == {name: len(b) for name, b in files.items()}
    assert again.digest == digest
    assert decode({name: store.read(again, name) for name in again.files}).position == pos


def test_ids_sort_by_epoch_then_step_whatever_the_commit_order(store):
    for epoch, step in [(2, 30), (0, 5), (10, 3), (1, 100), (0, 12), (1, 9)]:
        commit(store, "run", epoch, step)
    expected = [checkpoint_id(e, s) for e, s in sorted([(2, 30), (0, 5), (10, 3), (1, 100), (0, 12), (1, 9)])]
    assert ids(store.list("run")) == expected
    assert store.latest("run").id == checkpoint_id(10, 3)


def test_best_ignores_checkpoints_without_the_metric_and_prefers_the_newest_on_a_tie(store):
    commit(store, "run", 0, 1, metrics={"loss": 0.5})
    tied = commit(store, "run", 1, 2, metrics={"loss": 0.5})
    commit(store, "run", 2, 3, metrics={"acc": 1.0})
    assert store.best("run").id == tied.id
    assert store.best("run", "missing") is None
    with pytest.raises(CheckpointNotFound):
        store.resolve("run", "best", metric="missing")


def test_an_empty_or_unknown_lineage_has_nothing_to_resolve(store):
    assert store.list("nothing") == [] and store.latest("nothing") is None and store.lineages() == []
    with pytest.raises(CheckpointNotFound):
        store.resolve("nothing")
    commit(store, "run", 0, 1)
    with pytest.raises(CheckpointNotFound, match="000009-0000000009"):
        store.resolve("run", "000009-0000000009")


def test_lineages_lists_every_lineage_with_a_checkpoint_once(store):
    commit(store, "beta", 0, 1)
    commit(store, "alpha", 0, 1)
    commit(store, "alpha", 1, 2)
    assert store.lineages() == ["alpha", "beta"]


def test_a_folder_with_files_but_no_manifest_is_not_listed_and_is_reported_uncommitted(store):
    good = commit(store, "run", 0, 1)
    files, _, pos = training_files(1, 2)
    leftover = checkpoint_id(1, 2)
    for name, data in files.items():
        write_raw(store, file_path(store, "run", leftover, name), data)

    assert ids(store.list("run")) == [good.id]
    assert store.latest("run").id == good.id
    assert set(store.uncommitted("run")) == {leftover}
    assert 0 <= store.uncommitted("run")[leftover] < 120
    with pytest.raises(CheckpointNotFound):
        store.resolve("run", leftover)


def test_committing_the_same_id_with_the_same_digest_is_idempotent(store):
    files, digest, pos = training_files(0, 5)
    first = store.commit("run", pos, files, digest=digest, metrics={"loss": 1.0})
    again = store.commit("run", pos, files, digest=digest, metrics={"loss": 1.0})
    assert again == first  # the committed one, created_at included
    assert ids(store.list("run")) == [first.id]
    assert store.verify(first) == []


def test_a_repeated_commit_with_the_same_weights_but_other_state_leaves_the_committed_checkpoint_whole(store):
    files, digest, pos = training_files(0, 5)
    first = store.commit("run", pos, files, digest=digest)
    other_state = dict(files, **{META_FILE: bytes(files[META_FILE]).replace(b'"batches": 3.0', b'"batches": 4.0')})
    assert other_state[META_FILE] != files[META_FILE]
    assert store.commit("run", pos, other_state, digest=digest) == first
    assert store.verify(first) == []
    assert store.read(first, META_FILE) == files[META_FILE]


def test_committing_the_same_id_with_other_weights_raises_and_leaves_the_committed_one_intact(store):
    files, digest, pos = training_files(0, 5, seed=1)
    first = store.commit("run", pos, files, digest=digest)
    other, other_digest, _ = training_files(0, 5, seed=2)
    assert other_digest != digest
    with pytest.raises(CheckpointExists, match="000000-0000000005"):
        store.commit("run", pos, other, digest=other_digest)
    assert store.verify(first) == []
    assert store.read(first, MODEL_FILE) == files[MODEL_FILE]
    assert store.manifest("run", first.id) == first


def test_a_before_commit_hook_that_raises_commits_nothing(store):
    def refuse():
        raise RuntimeError("not allowed")

    files, digest, pos = training_files(0, 5)
    with pytest.raises(RuntimeError, match="not allowed"):
        store.commit("run", pos, files, digest=digest, before_commit=refuse)
    assert store.list("run") == []
    assert not store.fs.exists(file_path(store, "run", checkpoint_id(0, 5), MANIFEST_NAME))
    assert set(store.uncommitted("run")) == {checkpoint_id(0, 5)}


def test_a_before_commit_hook_runs_after_the_files_are_written_and_before_the_manifest(store):
    seen = []
    files, digest, pos = training_files(0, 5)
    folder = store.path("run", checkpoint_id(0, 5))
    store.commit("run", pos, files, digest=digest, before_commit=lambda: seen.append(
        (sorted(p.rsplit("/", 1)[-1] for p in store.fs.find(folder)), store.list("run"))))
    assert seen == [(sorted(files), [])]
    assert ids(store.list("run")) == [checkpoint_id(0, 5)]


# ---- verification ----------------------------------------------------------------------------
DATA_FILES = [MODEL_FILE, TENSORS_FILE, META_FILE]
DAMAGE = {"a flipped byte": flip_middle_byte, "a truncation": truncate}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("name", DATA_FILES)
def test_damage_to_a_checkpoint_file_is_detected_and_named_and_loading_falls_back(store, name, damage):
    good = commit(store, "run", 0, 10)
    bad = commit(store, "run", 1, 20)
    path = file_path(store, "run", bad.id, name)
    write_raw(store, path, DAMAGE[damage](read_raw(store, path)))

    problems = store.verify_lineage("run")
    assert len(problems) == 1 and problems[0].startswith(f"run/{bad.id}/{name}: "), problems
    assert store.verify(good) == []
    with pytest.raises(CheckpointCorrupted, match=name) as caught:
        store.read(bad, name)
    assert caught.value.checkpoint_id == bad.id and caught.value.problems[0].startswith(name)
    for other in set(DATA_FILES) - {name}:
        store.read(bad, other)  # the other files of the damaged checkpoint are still fine
    assert ids(store.list("run")) == [good.id, bad.id]  # the manifest is intact: still committed
    assert store.latest_verified("run").id == good.id


def test_a_missing_checkpoint_file_is_detected_and_named(store):
    good = commit(store, "run", 0, 10)
    bad = commit(store, "run", 1, 20)
    store.fs.rm_file(file_path(store, "run", bad.id, TENSORS_FILE))
    assert store.verify_lineage("run") == [f"run/{bad.id}/{TENSORS_FILE}: missing (expected "
                                           f"{bad.files[TENSORS_FILE].size} bytes)"]
    with pytest.raises(CheckpointCorrupted, match=f"{TENSORS_FILE}: missing"):
        store.read(bad, TENSORS_FILE)
    assert store.latest_verified("run").id == good.id


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_to_a_manifest_uncommits_its_checkpoint_with_a_warning_and_verify_reports_it(store, damage, caplog):
    good = commit(store, "run", 0, 10)
    bad = commit(store, "run", 1, 20)
    path = file_path(store, "run", bad.id, MANIFEST_NAME)
    write_raw(store, path, DAMAGE[damage](read_raw(store, path)))

    with caplog.at_level(logging.WARNING, logger="baton.ckpt"):
        assert ids(store.list("run")) == [good.id]
    assert any(MANIFEST_NAME in r.getMessage() and bad.id in r.getMessage() for r in caplog.records)
    problems = store.verify_lineage("run")
    assert len(problems) == 1 and f"{bad.id}/{MANIFEST_NAME}" in problems[0], problems
    assert store.latest("run").id == good.id
    assert store.latest_verified("run").id == good.id
    with pytest.raises(ValueError, match=MANIFEST_NAME):
        store.manifest("run", bad.id)


def test_a_manifest_edited_into_other_valid_json_fails_its_own_checksum(store, caplog):
    import json

    good = commit(store, "run", 0, 10, metrics={"loss": 0.9})
    bad = commit(store, "run", 1, 20, metrics={"loss": 0.5})
    path = file_path(store, "run", bad.id, MANIFEST_NAME)
    envelope = json.loads(read_raw(store, path))
    envelope["manifest"]["metrics"]["loss"] = 0.1  # a plausible, well-formed lie
    write_raw(store, path, json.dumps(envelope).encode())

    with caplog.at_level(logging.WARNING, logger="baton.ckpt"):
        assert ids(store.list("run")) == [good.id]
    problems = store.verify_lineage("run")
    assert len(problems) == 1 and "sha256" in problems[0] and MANIFEST_NAME in problems[0]


def test_latest_verified_skips_every_damaged_checkpoint_and_honours_at_most_epochs(store):
    oldest = commit(store, "run", 0, 10)
    middle = commit(store, "run", 1, 20)
    newest = commit(store, "run", 2, 30)
    for manifest in (middle, newest):
        path = file_path(store, "run", manifest.id, MODEL_FILE)
        write_raw(store, path, flip_middle_byte(read_raw(store, path)))
    assert store.latest_verified("run").id == oldest.id
    assert store.latest_verified("run", at_most_epochs=0) is None
    path = file_path(store, "run", oldest.id, META_FILE)
    write_raw(store, path, truncate(read_raw(store, path)))
    assert store.latest_verified("run") is None


# ---- aliases ---------------------------------------------------------------------------------
def test_pinning_names_a_checkpoint_by_alias_until_unpinned(store):
    first = commit(store, "run", 0, 10)
    second = commit(store, "run", 1, 20)
    assert store.aliases("run") == {}
    store.pin("run", first.id, "production")
    store.pin("run", second.id, "candidate")
    assert store.aliases("run") == {"production": first.id, "candidate": second.id}
    assert store.resolve("run", "production").id == first.id
    store.pin("run", second.id, "production")  # moving an alias
    assert store.aliases("run")["production"] == second.id
    store.unpin("run", "production")
    assert store.aliases("run") == {"candidate": second.id}
    with pytest.raises(CheckpointNotFound, match="production"):
        store.unpin("run", "production")
    with pytest.raises((CheckpointNotFound, InvalidName), match="production"):
        store.resolve("run", "production")  # no longer an alias, and not an id either


def test_pinning_a_checkpoint_that_is_not_committed_is_refused(store):
    commit(store, "run", 0, 10)
    with pytest.raises(CheckpointNotFound):
        store.pin("run", checkpoint_id(5, 5), "production")
    assert store.aliases("run") == {}


# ---- deleting --------------------------------------------------------------------------------
def test_delete_uncommits_then_removes_the_files_and_returns_the_bytes_freed(store):
    keep = commit(store, "run", 0, 10)
    gone = commit(store, "run", 1, 20)
    freed = store.delete("run", gone.id)
    assert freed == gone.total_bytes > 0
    assert ids(store.list("run")) == [keep.id]
    assert store.uncommitted("run") == {}
    assert store.fs.find(store.path("run", gone.id)) == []
    assert store.verify(keep) == []
    assert store.delete("run", gone.id) == 0


def test_delete_removes_the_manifest_before_any_other_file_and_its_marker_last():
    from fsspec.implementations.memory import MemoryFileSystem

    from ckpt.store import DELETING_MARKER

    removed: list[str] = []

    class RecordingFileSystem(MemoryFileSystem):
        """The real in-memory filesystem, remembering what it removed and in which order."""

        def rm_file(self, path):
            removed.append(path.rsplit("/", 1)[-1])
            super().rm_file(path)

    store = CheckpointStore(f"memory://order-{uuid.uuid4().hex}")
    gone = commit(store, "run", 0, 10)
    store.fs = RecordingFileSystem(skip_instance_cache=True)
    store.delete("run", gone.id)
    assert removed[0] == MANIFEST_NAME and removed[-1] == DELETING_MARKER
    assert set(gone.files) == set(removed[1:-1])


def test_an_interrupted_delete_is_a_leftover_removable_at_once(tmp_path):
    from ckpt.store import DELETING_MARKER

    store = CheckpointStore(str(tmp_path / "store"))
    gone = commit(store, "run", 0, 10)
    folder = Path(store.path("run", gone.id))
    (folder / DELETING_MARKER).write_bytes(b"")  # where a killed delete stops: marker, no manifest
    (folder / MANIFEST_NAME).unlink()
    assert store.uncommitted("run") == {gone.id: float("inf")}


def test_delete_also_removes_an_uncommitted_leftover(store):
    files, _, _ = training_files(1, 2)
    for name, data in files.items():
        write_raw(store, file_path(store, "run", checkpoint_id(1, 2), name), data)
    assert store.delete("run", checkpoint_id(1, 2)) == sum(len(b) for b in files.values())
    assert store.uncommitted("run") == {}


# ---- names -----------------------------------------------------------------------------------
BAD_NAMES = ["..", "../escape", "/abs", "a/b", "a\\b", "", ".hidden", "x" * 129, "nl\n", "run\n", "a\nb"]


def test_an_unsafe_lineage_name_is_rejected_before_anything_is_written(store, subtests):
    files, digest, pos = training_files(0, 1)
    for name in BAD_NAMES:
        with subtests.test(lineage=name):
            with pytest.raises(InvalidName, match="lineage"):
                store.commit(name, pos, files, digest=digest)
            for query in (store.list, store.latest, store.aliases, store.uncommitted, store.verify_lineage,
                          store.resolve):
                with pytest.raises(InvalidName):
                    query(name)
            with pytest.raises(InvalidName):
                Lease(store, name).acquire()
    assert store.lineages() == []


def test_an_unsafe_alias_name_is_rejected(store, subtests):
    manifest = commit(store, "run", 0, 1)
    for name in BAD_NAMES:
        with subtests.test(alias=name):
            with pytest.raises(InvalidName, match="alias"):
                store.pin("run", manifest.id, name)
            with pytest.raises(InvalidName, match="alias"):
                store.unpin("run", name)
    assert store.aliases("run") == {}


def test_a_selector_that_is_neither_an_alias_nor_an_id_is_rejected(store, subtests):
    commit(store, "run", 0, 1)
    for selector in ["../run/000000-0000000001", "000000-0000000001/..", ""]:
        with subtests.test(selector=selector):
            with pytest.raises(InvalidName, match="alias"):
                store.resolve("run", selector)
            with pytest.raises(InvalidName):
                store.delete("run", selector)
    for selector in ["not-an-id", "0-1"]:  # could be aliases: not found, naming the known ones
        with subtests.test(selector=selector):
            with pytest.raises(CheckpointNotFound, match="has no alias"):
                store.resolve("run", selector)
            with pytest.raises(InvalidName):
                store.delete("run", selector)


def test_a_checkpoint_id_with_a_trailing_newline_is_not_an_id(store):
    manifest = commit(store, "run", 0, 1)
    with pytest.raises(InvalidName):
        store.manifest("run", manifest.id + "\n")
    with pytest.raises(InvalidName):
        store.delete("run", manifest.id + "\n")
    assert store.list("run") == [manifest]


def test_names_that_are_safe_are_accepted(store):
    for name in ["run", "Run-2.v1_final", "0", "x" * 128]:
        commit(store, name, 0, 1)
    assert store.lineages() == sorted(["run", "Run-2.v1_final", "0", "x" * 128])


# ---- freshness -------------------------------------------------------------------------------
def test_a_second_store_instance_sees_commits_deletes_and_pins_at_once(store_url):
    writer, reader = CheckpointStore(store_url), CheckpointStore(store_url)
    first = commit(writer, "run", 0, 10)
    # The reader has looked, as a resumed run or a cleanup would: a cached listing would now be stale.
    assert reader.lineages() == ["run"] and ids(reader.list("run")) == [first.id]
    assert reader.aliases("run") == {} and reader.uncommitted("run") == {}

    commit(writer, "other", 0, 1)
    assert reader.lineages() == ["other", "run"]
    second = commit(writer, "run", 1, 20)
    assert ids(reader.list("run")) == [first.id, second.id] and reader.latest("run").id == second.id
    writer.pin("run", first.id, "production")
    assert reader.aliases("run") == {"production": first.id}
    writer.delete("run", second.id)
    assert ids(reader.list("run")) == [first.id]
    files, _, _ = training_files(2, 30)
    write_raw(writer, file_path(writer, "run", checkpoint_id(2, 30), MODEL_FILE), files[MODEL_FILE])
    assert set(reader.uncommitted("run")) == {checkpoint_id(2, 30)}


# ---- crash safety (the slow part: ~20 SIGKILLed writers per backend) -------------------------
CRASH_TRIALS = 20


class Writer:
    """tests/ckpt/_writer.py: a separate process that forks one committing child per trial."""

    def __init__(self, url: str):
        self.child: int | None = None
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, str(WRITER), url], cwd=ROOT, env=env,  # this checkout's ckpt
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.expect("ready")

    def expect(self, *words: str) -> dict[str, list[str]]:
        """The next len(words) lines, in any order (parent and child share the pipe)."""
        said = {}
        for _ in words:
            line = self.proc.stdout.readline().split()
            assert line and line[0] in words and line[0] not in said, f"writer said {line!r}, expected {words!r}"
            said[line[0]] = line[1:]
        return said

    def start(self, lineage: str) -> int:
        self.proc.stdin.write(f"{lineage}\n")
        said = self.expect("started", "writing")  # forked, then connected and about to write
        self.child = int(said["started"][0])
        assert int(said["writing"][0]) == self.child
        return self.child

    def kill(self, pid: int) -> int:
        os.kill(pid, signal.SIGKILL)
        signum = int(self.expect("killed")["killed"][1])  # the parent reaped it: it writes nothing more
        self.child = None
        return signum

    def close(self) -> None:
        if self.child is not None:  # a trial failed half-way: stop its writer first
            try:
                os.kill(self.child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def folders(store: CheckpointStore, lineage: str) -> tuple[set[str], set[str]]:
    """(checkpoint folders holding any file, those holding a manifest), read straight from the fs."""
    base = store.path(lineage)
    if not store.fs.exists(base):
        return set(), set()
    rel = [p[len(base) + 1 :].split("/") for p in store.fs.find(base)]
    with_files = {r[0] for r in rel if len(r) >= 2 and not r[0].startswith("_")}
    with_manifest = {r[0] for r in rel if len(r) == 2 and r[1] == MANIFEST_NAME}
    return with_files, with_manifest


@pytest.mark.slow
@pytest.mark.parametrize("store_url", SHARED_BACKENDS, indirect=True)
def test_a_writer_killed_at_random_moments_never_leaves_a_listed_partial_checkpoint(store_url):
    rng = random.Random(1234)
    began = time.monotonic()
    writer = Writer(store_url)
    try:
        # Calibrate the kill window to a few commits of this backend.
        pid = writer.start("calibrate")
        time.sleep(1.0)
        writer.kill(pid)
        commits_per_s = max(len(CheckpointStore(store_url).list("calibrate")), 1) / 1.0
        window = min(3.0 / commits_per_s, 2.0)

        caught_partial, committed = 0, 0
        for trial in range(CRASH_TRIALS):
            lineage = f"trial{trial}"
            pid = writer.start(lineage)
            time.sleep(rng.uniform(0.02, window))
            signum = writer.kill(pid)
            assert signum == signal.SIGKILL

            reader = CheckpointStore(store_url)  # as another process would: nothing cached
            listed = reader.list(lineage)
            for manifest in listed:  # every file verifies (read checks size and sha256) and loads
                state = decode({name: reader.read(manifest, name) for name in manifest.files})
                assert state.position == manifest.position
            with_files, with_manifest = folders(reader, lineage)
            assert with_manifest == set(ids(listed)), f"trial {trial}: a manifest is unreadable"
            leftovers = set(reader.uncommitted(lineage))
            assert leftovers == with_files - with_manifest, f"trial {trial}"
            for leftover in leftovers:
                with pytest.raises(CheckpointNotFound):
                    reader.resolve(lineage, leftover)
            caught_partial += bool(leftovers)
            committed += len(listed)
            if reader.fs.exists(reader.path(lineage)):  # keep the store small
                reader.fs.rm(reader.path(lineage), recursive=True)
    finally:
        writer.close()
    print(f"\n{store_url}: {caught_partial}/{CRASH_TRIALS} kills left a partial checkpoint, {committed} were "
          f"committed, kill window {window:.2f} s, {time.monotonic() - began:.1f} s in all")
    assert caught_partial >= 3, f"only {caught_partial} of {CRASH_TRIALS} kills caught a write in progress"
    assert committed >= 3, "the writer hardly committed anything: the kills came too early"
