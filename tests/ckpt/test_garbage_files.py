"""Garbage in the store's small metadata files (a manifest, an alias, a lease record): an error that
names the file, or a warning and a skip where the rest of the store is still usable; never a
traceback from a parser."""

from __future__ import annotations

import logging

import pytest

from ckpt import (
    CheckpointError,
    Lease,
    LeaseUnreadable,
    ManifestUnreadable,
    RetentionPolicy,
    prune,
)
from ckpt.manifest import MANIFEST_NAME

from .test_store import commit, file_path, write_raw

GARBAGE = [b"", b"\x00\xff garbage", b"{not json", b"[1, 2]", b'{"id": 5}', b'"a string"']


@pytest.mark.parametrize("garbage", GARBAGE)
def test_showing_a_checkpoint_with_a_garbage_manifest_names_the_file(store, garbage):
    manifest = commit(store, "run", 0, 10)
    path = file_path(store, "run", manifest.id, MANIFEST_NAME)
    write_raw(store, path, garbage)
    for show in (lambda: store.manifest("run", manifest.id), lambda: store.resolve("run", manifest.id)):
        with pytest.raises(ManifestUnreadable, match="unreadable manifest") as caught:
            show()
        assert caught.value.path == path and path in str(caught.value)
        assert isinstance(caught.value, CheckpointError) and isinstance(caught.value, ValueError)


@pytest.mark.parametrize("garbage", GARBAGE + [b'{"id": "../../etc"}', b'{"id": "000001-0000000001\\n"}'])
def test_a_garbage_alias_file_is_skipped_with_a_warning_naming_it(store, garbage, caplog):
    first = commit(store, "run", 0, 10)
    commit(store, "run", 1, 20)
    store.pin("run", first.id, "production")
    bad = store.path("run", "_aliases", "broken.json")
    write_raw(store, bad, garbage)

    with caplog.at_level(logging.WARNING, logger="baton.ckpt"):
        assert store.aliases("run") == {"production": first.id}
    assert any(bad in r.getMessage() for r in caplog.records)
    assert store.resolve("run", "production") == first


def test_whole_store_cleanup_goes_on_past_a_garbage_alias_file(store):
    for epoch in range(4):
        commit(store, "run", epoch, 10 * (epoch + 1))
    write_raw(store, store.path("run", "_aliases", "broken.json"), b"\x00garbage")
    result = prune(store, RetentionPolicy(keep_last=2))
    assert len(result.deleted) == 2 and [m.epoch for m in store.list("run")] == [2, 3]


@pytest.mark.parametrize("garbage", GARBAGE + [b'{"owner": "x"}'])
def test_a_garbage_lease_file_is_an_error_naming_the_file(store, garbage):
    commit(store, "run", 0, 10)
    path = store.path("run", "_lease", "current.json")
    write_raw(store, path, garbage)
    for call in (lambda: Lease.current(store, "run"), lambda: Lease(store, "run").acquire()):
        with pytest.raises(LeaseUnreadable) as caught:
            call()
        assert caught.value.path == path and path in str(caught.value)
        assert "validation error for" not in str(caught.value)  # pydantic's own wording, not ours
        assert "delete that file" in str(caught.value)


def test_a_garbage_lease_file_protects_its_lineage_from_cleanup_as_a_live_lease_would(store):
    for epoch in range(4):
        commit(store, "run", epoch, 10 * (epoch + 1))
    write_raw(store, store.path("run", "_lease", "current.json"), b"garbage")
    prune(store, RetentionPolicy(keep_last=1))
    assert [m.epoch for m in store.list("run")] == [2, 3]
