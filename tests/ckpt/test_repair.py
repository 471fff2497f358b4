"""A committed checkpoint whose files were damaged after the commit (a flipped byte, a truncation,
a lost file) is replaced when the same checkpoint is committed again, never reported as success;
and the queries training resumes by skip it."""

from __future__ import annotations

import pytest

from ckpt import CheckpointCorrupted, CheckpointNotFound, CheckpointStore, InjectedFault, LeaseLost, faults
from ckpt.manifest import MANIFEST_NAME
from ckpt.state import META_FILE, MODEL_FILE, TENSORS_FILE

from .test_store import commit, file_path, flip_middle_byte, read_raw, training_files, truncate, write_raw

DAMAGE = {
    "a flipped byte": lambda store, path: write_raw(store, path, flip_middle_byte(read_raw(store, path))),
    "a truncation": lambda store, path: write_raw(store, path, truncate(read_raw(store, path))),
    "a lost file": lambda store, path: store.fs.rm_file(path),
}


def damage(store: CheckpointStore, manifest, name: str, how: str = "a flipped byte") -> None:
    DAMAGE[how](store, file_path(store, manifest.lineage, manifest.id, name))
    assert store.verify(manifest), "the damage went unnoticed: the test would prove nothing"


@pytest.mark.parametrize("how", list(DAMAGE))
@pytest.mark.parametrize("name", [MODEL_FILE, TENSORS_FILE, META_FILE])
def test_committing_a_damaged_checkpoint_again_replaces_it_and_it_verifies(store, name, how):
    commit(store, "run", 0, 10)
    files, digest, pos = training_files(1, 20)
    damaged = store.commit("run", pos, files, digest=digest)
    damage(store, damaged, name, how)

    repaired = store.commit("run", pos, files, digest=digest)

    assert repaired.id == damaged.id and repaired.created_at > damaged.created_at  # a new commit, not the old one
    assert store.verify_lineage("run") == []
    assert store.manifest("run", damaged.id) == repaired
    assert store.read(repaired, name) == files[name]
    assert store.latest_verified("run") == repaired


def test_a_damaged_checkpoint_is_replaced_even_by_other_weights(store):
    files, digest, pos = training_files(1, 20, seed=1)
    damaged = store.commit("run", pos, files, digest=digest)
    damage(store, damaged, MODEL_FILE)
    other, other_digest, _ = training_files(1, 20, seed=2)  # nondeterministic training, say
    repaired = store.commit("run", pos, other, digest=other_digest)
    assert repaired.digest == other_digest and store.verify(repaired) == []


def test_a_whole_checkpoint_committed_again_is_returned_untouched(store):
    files, digest, pos = training_files(1, 20)
    first = store.commit("run", pos, files, digest=digest)
    assert store.commit("run", pos, files, digest=digest) == first  # created_at included: nothing rewritten


def test_no_reader_sees_the_manifest_while_the_files_are_rewritten(store):
    """The crash-safe order: the damaged checkpoint is un-committed before any file is touched."""
    before = commit(store, "run", 0, 10)
    files, digest, pos = training_files(1, 20)
    damaged = store.commit("run", pos, files, digest=digest)
    damage(store, damaged, TENSORS_FILE)
    seen = []

    def look() -> None:  # what another process sees at that moment
        reader = CheckpointStore(store.url)
        seen.append(([m.id for m in reader.list("run")], set(reader.uncommitted("run"))))

    with faults.inject("repair.after_uncommit", look):
        store.commit("run", pos, files, digest=digest)
    assert seen == [([before.id], {damaged.id})]


def test_a_repair_that_dies_half_way_leaves_the_previous_checkpoint_latest_and_the_next_commit_finishes_it(store):
    before = commit(store, "run", 0, 10)
    files, digest, pos = training_files(1, 20)
    damaged = store.commit("run", pos, files, digest=digest)
    damage(store, damaged, MODEL_FILE, "a truncation")

    with faults.inject("repair.after_uncommit", "raise"), pytest.raises(InjectedFault):
        store.commit("run", pos, files, digest=digest)
    assert store.latest("run") == before and store.verify_lineage("run") == []
    assert set(store.uncommitted("run")) == {damaged.id}

    repaired = store.commit("run", pos, files, digest=digest)
    assert store.latest("run") == repaired and store.verify_lineage("run") == []


def test_a_writer_that_lost_its_lease_cannot_uncommit_a_damaged_checkpoint(store):
    files, digest, pos = training_files(1, 20)
    damaged = store.commit("run", pos, files, digest=digest)
    damage(store, damaged, MODEL_FILE)

    def fenced() -> None:
        raise LeaseLost("taken over")

    with pytest.raises(LeaseLost):
        store.commit("run", pos, files, digest=digest, before_commit=fenced)
    assert store.manifest("run", damaged.id) == damaged  # still there, for the lease holder to repair


def test_resolve_verified_falls_back_from_a_damaged_latest_or_best_and_refuses_a_damaged_id(store):
    good = commit(store, "run", 0, 10, metrics={"loss": 0.5})
    bad = commit(store, "run", 1, 20, metrics={"loss": 0.1})
    damage(store, bad, MODEL_FILE)

    assert store.resolve("run", "latest") == bad  # by manifests alone: cheap, unverified
    assert store.resolve("run", "latest", verified=True) == good
    assert store.resolve("run", "best", verified=True) == good
    assert store.best("run", verified=True) == good
    store.pin("run", bad.id, "production")
    for selector in (bad.id, "production"):
        with pytest.raises(CheckpointCorrupted, match=MODEL_FILE):
            store.resolve("run", selector, verified=True)
    damage(store, good, META_FILE)
    with pytest.raises(CheckpointNotFound, match="verify"):
        store.resolve("run", "latest", verified=True)


def test_a_garbled_manifest_does_not_block_committing_that_checkpoint_again(store):
    files, digest, pos = training_files(1, 20)
    first = store.commit("run", pos, files, digest=digest)
    path = file_path(store, "run", first.id, MANIFEST_NAME)
    write_raw(store, path, b"{not json")
    again = store.commit("run", pos, files, digest=digest)
    assert store.list("run") == [again] and store.verify_lineage("run") == []


@pytest.mark.parametrize("name", [MODEL_FILE, TENSORS_FILE, META_FILE])
def test_a_checkpoint_whose_hashes_match_but_which_does_not_decode_is_replaced_by_a_training_state(store, name):
    import pickle

    from ckpt import decode

    files, digest, pos = training_files(1, 20)
    planted_files = {n: bytes(b) for n, b in files.items()}
    planted_files[name] = pickle.dumps({"not": "a training state"})
    planted = store.commit("run", pos, planted_files, digest=digest)  # plain bytes: no format to ask
    assert store.verify(planted) == []

    repaired = store.commit("run", pos, files, digest=digest)

    assert repaired.created_at > planted.created_at and store.verify_lineage("run") == []
    decode({n: store.read(repaired, n) for n in repaired.files})


def test_a_whole_checkpoint_that_decodes_is_kept_when_committed_again_by_a_training_state(store):
    files, digest, pos = training_files(1, 20)
    first = store.commit("run", pos, {n: bytes(b) for n, b in files.items()}, digest=digest)
    assert store.commit("run", pos, files, digest=digest) == first
