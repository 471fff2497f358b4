"""Several cleanups of one store at once (a nightly cleanup, a `baton cleanup` by hand, the pruning
of a training block): their deletions race, and none of them may fail for it."""

from __future__ import annotations

import pytest

import os
import subprocess
import sys
import time
from pathlib import Path

from ckpt import CheckpointStore, FileEntry, Manifest, Position, checkpoint_id
from ckpt._io import sha256_hex
from ckpt.manifest import MANIFEST_NAME, encode_manifest

PRUNER = Path(__file__).with_name("_pruner.py")
ROOT = Path(__file__).resolve().parents[2]
PAYLOAD = b"w" * 64


def populate(root: Path, lineages: int, per_lineage: int, leftovers: int) -> None:
    """Committed checkpoints of three files each, and old manifest-less leftovers, written directly
    (no fsync): the setup is not what is tested."""
    entry = FileEntry(size=len(PAYLOAD), sha256=sha256_hex(PAYLOAD))
    names = ["model.safetensors", "train_state.safetensors", "state.json"]
    old = time.time() - 7200
    for n in range(lineages):
        lineage = f"lineage-{n}"
        for i in range(per_lineage + leftovers):
            folder = root / lineage / checkpoint_id(i, i + 1)
            folder.mkdir(parents=True)
            for name in names:
                (folder / name).write_bytes(PAYLOAD)
            if i < leftovers:  # the oldest ones: a save that died long ago
                for name in names:
                    os.utime(folder / name, (old, old))
                continue
            manifest = Manifest(lineage=lineage, id=folder.name, files={name: entry for name in names},
                                position=Position(epoch=i, batch_in_epoch=0, epoch_complete=True, step=i + 1),
                                digest="0" * 64)
            (folder / MANIFEST_NAME).write_bytes(encode_manifest(manifest))


class Pruners:
    """Cleanup processes (tests/ckpt/_pruner.py), each pruning the whole store on every `go`."""

    def __init__(self, url: str, count: int, keep_last: int):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.procs = [subprocess.Popen([sys.executable, str(PRUNER), url, str(keep_last)], cwd=ROOT, env=env,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
                      for _ in range(count)]
        assert [p.stdout.readline().strip() for p in self.procs] == ["ready"] * count

    def go(self) -> list[str]:
        for proc in self.procs:  # one write each, back to back: they start within a millisecond or so
            proc.stdin.write("go\n")
        return [proc.stdout.readline().strip() for proc in self.procs]

    def close(self) -> None:
        for proc in self.procs:
            proc.stdin.close()
            proc.wait(30)


@pytest.mark.slow
def test_three_cleanups_at_once_all_succeed_and_leave_exactly_what_the_policy_keeps(tmp_path):
    root = tmp_path / "store"
    pruners = Pruners(str(root), count=3, keep_last=2)
    try:
        for trial in range(4):
            populate(root, lineages=3, per_lineage=150, leftovers=20)
            assert pruners.go() == ["ok"] * 3, f"trial {trial}"
            store = CheckpointStore(str(root))
            for lineage in store.lineages():
                assert [m.id for m in store.list(lineage)] == [checkpoint_id(i, i + 1) for i in (168, 169)]
                assert sorted(os.listdir(root / lineage)) == [checkpoint_id(i, i + 1) for i in (168, 169)]
                assert store.verify_lineage(lineage) == []
            for lineage in store.lineages():  # the next trial starts from an empty store
                for ckpt in store.list(lineage):
                    store.delete(lineage, ckpt.id)
                os.rmdir(root / lineage)
    finally:
        pruners.close()
