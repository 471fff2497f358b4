"""cleanup_10k_s: plan and delete over 10,000 checkpoints in 100 lineages on the local store.

Storage calls are counted by wrapping the store's fsspec filesystem methods (top-level calls only:
a `glob` that walks internally counts once) and Baton's direct local-disk helpers in `ckpt._io`.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from collections import Counter
from contextlib import contextmanager

from ckpt import CheckpointStore, Position, RetentionPolicy, checkpoint_id, prune
from ckpt import _io
from ckpt.manifest import MANIFEST_NAME, FileEntry, Manifest
from ckpt.store import _encode_manifest

from ._common import Result

FS_METHODS = ("ls", "glob", "find", "walk", "exists", "isdir", "isfile", "info", "cat", "cat_file", "open",
              "pipe_file", "rm", "rm_file", "rmdir", "mkdir", "makedirs", "du", "expand_path")
IO_FUNCTIONS = ("read_bytes", "write_file", "write_atomic", "write_exclusive")


def _populate(root: str, lineages: int, per_lineage: int) -> None:
    """Committed checkpoints, written directly (no fsync): the setup is not what is measured."""
    payload = b"w" * 64
    entry = FileEntry(size=len(payload), sha256=_io.sha256_hex(payload))
    for n in range(lineages):
        lineage = f"lineage-{n:03d}"
        for i in range(per_lineage):
            ckpt_id = checkpoint_id(i, (i + 1) * 10)
            folder = os.path.join(root, lineage, ckpt_id)
            os.makedirs(folder)
            with open(os.path.join(folder, "model.safetensors"), "wb") as handle:
                handle.write(payload)
            manifest = Manifest(lineage=lineage, id=ckpt_id, metrics={"loss": 1.0 / (i + 1)},
                                position=Position(epoch=i, batch_in_epoch=0, epoch_complete=True, step=(i + 1) * 10),
                                files={"model.safetensors": entry}, digest="0" * 64)
            with open(os.path.join(folder, MANIFEST_NAME), "wb") as handle:
                handle.write(_encode_manifest(manifest))


@contextmanager
def counting(store: CheckpointStore):
    calls: Counter[str] = Counter()
    seconds: Counter[str] = Counter()
    depth = [0]

    def wrap(name, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if depth[0] == 0:
                calls[name] += 1
            top, started = depth[0] == 0, time.perf_counter()
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                if top:
                    seconds[name] += time.perf_counter() - started
        return counted

    saved_io = {name: getattr(_io, name) for name in IO_FUNCTIONS}
    for name in FS_METHODS:
        if hasattr(store.fs, name):
            setattr(store.fs, name, wrap(f"fs.{name}", getattr(store.fs, name)))
    for name, fn in saved_io.items():
        setattr(_io, name, wrap(f"io.{name}", fn))
    try:
        yield calls, seconds
    finally:
        for name in FS_METHODS:
            store.fs.__dict__.pop(name, None)
        for name, fn in saved_io.items():
            setattr(_io, name, fn)


def cleanup(lineages: int = 100, per_lineage: int = 100, keep_last: int = 10, where: str | None = None) -> Result:
    root = tempfile.mkdtemp(prefix="baton-bench-cleanup-", dir=where)
    try:
        _populate(root, lineages, per_lineage)
        store = CheckpointStore(root)
        with counting(store) as (calls, call_seconds):
            started = time.perf_counter()
            result = prune(store, RetentionPolicy(keep_last=keep_last))
            seconds = time.perf_counter() - started
        deleted = len(result.deleted)
        remaining = sum(len(store.list(name)) for name in store.lineages())
        total = sum(calls.values())
        return Result("cleanup_10k_s", seconds, "< 10 s", seconds < 10, unit="s", detail={
            "checkpoints": lineages * per_lineage, "lineages": lineages, "deleted": deleted,
            "remaining_ok": remaining == lineages * keep_last, "storage_calls": total,
            "calls_per_deletion": round(total / max(deleted, 1), 2),
            "calls": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
            "call_seconds": {k: round(v, 2) for k, v in sorted(call_seconds.items(), key=lambda kv: -kv[1])}},
            note=f"prune(keep_last={keep_last}) over the whole store")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def cleanup_dry_run_cli(lineages: int = 10, per_lineage: int = 100, keep_last: int = 3, where: str | None = None) -> Result:
    """`baton cleanup STORE --dry-run` as a user runs it: a whole process, with no Prefect server
    (PREFECT_API_URL unset), over 1,000 checkpoints; imports and start-up are part of the figure."""
    import subprocess
    import sys

    root = tempfile.mkdtemp(prefix="baton-bench-cleanup-cli-", dir=where)
    try:
        _populate(root, lineages, per_lineage)
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        baton = os.path.join(os.path.dirname(sys.executable), "baton")
        started = time.perf_counter()
        out = subprocess.run([baton, "cleanup", root, "--keep-last", str(keep_last), "--dry-run"], env=env,
                             capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - started
        if out.returncode != 0:
            raise RuntimeError(f"baton cleanup failed ({out.returncode}):\n{out.stderr[-2000:]}")
        summary = out.stdout.strip().splitlines()[-1]
        untouched = sum(len(CheckpointStore(root).list(name)) for name in CheckpointStore(root).lineages())
        return Result("cleanup_dry_run_1k_s", seconds, "< 5 s", seconds < 5, unit="s", detail={
            "checkpoints": lineages * per_lineage, "lineages": lineages,
            "would_delete": lineages * (per_lineage - keep_last),
            "summary_ok": summary.startswith(f"would delete {lineages * (per_lineage - keep_last)},"),
            "nothing_deleted": untouched == lineages * per_lineage},
            note=f"`baton cleanup --keep-last {keep_last} --dry-run`, a whole process, no PREFECT_API_URL")
    finally:
        shutil.rmtree(root, ignore_errors=True)
