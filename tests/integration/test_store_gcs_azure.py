"""Stores on Google Cloud Storage and Azure Blob, against their emulators (fake-gcs-server, Azurite):
a file too large for one request goes up in parts and is never seen half-written, and `baton train`
killed mid-run and run again ends bit-identical to an uninterrupted run on local disk.

The store's contract suite (tests/ckpt: store, lease, repair, leftovers, sharded commits, the
process race for a lease, the SIGKILL-mid-commit trials) runs on both services too, through the
`gcs` and `azure` backends of tests/ckpt/conftest.py."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from ckpt import CheckpointStore, Position

from .support import kill_group, run_baton, start_baton, wait_for

pytestmark = pytest.mark.integration

SERVICES = [pytest.param("gcs", marks=pytest.mark.gcs), pytest.param("azure", marks=pytest.mark.azure)]
# Over gcsfs's one-request limit (50 MiB: a resumable upload) and Azure's (64 MiB: staged blocks).
LARGE = 70 * 2**20
# One block per run (one Ray Train fit: most of a run's time is starting one), committing every 3 of
# its 48 steps: the kill lands mid-block, and the next run resumes mid-epoch.
TRAIN = ["--recipe", "tests.integration.recipes:drill", "--epochs", "6", "--epochs-per-block", "6",
         "--workers", "2", "--checkpoint-every-steps", "3"]


@pytest.fixture(params=SERVICES)
def service(request) -> tuple[str, str, dict[str, str]]:
    """(service, a fresh store URL there, the environment naming its emulator)."""
    env = request.getfixturevalue(f"{request.param}_env")
    return request.param, request.getfixturevalue(f"{request.param}_store") + "/runs", env


def test_a_file_too_large_for_one_request_goes_up_in_parts_and_is_never_seen_half_written(service):
    _, url, _ = service
    store, reader = CheckpointStore(url), CheckpointStore(url)
    payload = os.urandom(LARGE)
    path = store.path("big", "00000001-0000000010", "model.bin")
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:  # another client, listing while the upload runs
        while not stop.is_set():
            try:
                seen.append(int(reader.fs.info(path)["size"]))
            except FileNotFoundError:
                pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        manifest = store.commit("big", Position(epoch=1, batch_in_epoch=0, epoch_complete=True, step=10),
                                {"model.bin": payload}, digest="d")
    finally:
        stop.set()
        watcher.join(30)
    assert set(seen) <= {LARGE}, f"a partial object was visible: sizes {sorted(set(seen))}"
    assert [m.id for m in reader.list("big")] == [manifest.id]
    assert reader.verify(manifest) == []
    assert bytes(reader.read(manifest, "model.bin")) == payload


@pytest.fixture(scope="module")
def local_baseline(cluster_env, tmp_path_factory) -> str:
    """The digest of an uninterrupted run on local disk, which the interrupted cloud runs must equal."""
    work = tmp_path_factory.mktemp("cloud-baseline")
    store = str(work / "ckpts")
    out = run_baton(["train", "--store", store, "--lineage", "baseline", *TRAIN], cluster_env, work, timeout=500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
    return CheckpointStore(store).latest("baseline").digest


def test_baton_train_killed_mid_run_and_run_again_ends_bit_identical_to_an_uninterrupted_run(
        service, local_baseline, cluster_env, workdir: Path):
    name, url, service_env = service
    env = dict(cluster_env, **service_env)  # the Ray workers get them through FORWARDED_ENV
    args = ["train", "--store", url, "--lineage", "cloud", *TRAIN]
    log = workdir / "killed.log"
    proc = start_baton(args, env, workdir, log)
    try:
        wait_for(lambda: CheckpointStore(url).latest("cloud"), 300, f"a checkpoint on {name}", proc, log)
    finally:
        kill_group(proc)  # the whole session: driver, and this host's lease holder with it
    first = CheckpointStore(url).latest("cloud")
    out = run_baton(args, env, workdir, timeout=500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
    assert "took over the lease" in out.stderr
    store = CheckpointStore(url)
    final = store.latest("cloud")
    assert final.epochs_done == 6 and final.id > first.id
    assert final.digest == local_baseline
    assert store.verify_lineage("cloud") == []
