"""What the UI shows of a lineage: which run committed each checkpoint, the loss across runs, and
after a failure, where a Retry resumes. No `file://` links."""

from __future__ import annotations

import base64
import io
import re

import torch
from PIL import Image

from ckpt import CheckpointStore, Lease, Position, TrainingState, encode
from flows.artifacts import committed_by, lineage_markdown

RUN_A = "flow run run-a-20261127-020000 0f0e0d0c-0000-4000-8000-00000000000a (host:1)"
RUN_B = "flow run run-b-20261128-020000 0f0e0d0c-0000-4000-8000-00000000000b (host:2)"


def _train_under_lease(store: CheckpointStore, owner: str, epochs: range) -> None:
    with Lease(store, "demo", owner=owner) as lease:
        for epoch in epochs:
            position = Position(epoch=epoch, batch_in_epoch=4, epoch_complete=True, step=4 * (epoch + 1))
            files = encode(TrainingState(model=torch.nn.Linear(2, 2).state_dict(), position=position))
            store.commit("demo", position, files, metrics={"loss": 1.0 / (epoch + 1)}, fence=lease.fence)


def test_the_lineage_page_names_the_run_that_committed_each_checkpoint_and_where_retry_resumes(tmp_path):
    store = CheckpointStore(str(tmp_path / "store"))
    _train_under_lease(store, RUN_A, range(0, 2))   # a first run, then it crashed
    _train_under_lease(store, RUN_B, range(2, 3))   # the retry, which failed again
    manifests = store.list("demo")
    runs = committed_by(store, "demo", manifests)
    assert sorted(runs.values()) == ["run-a-20261127-020000 (0f0e0d0c)", "run-b-20261128-020000 (0f0e0d0c)"]

    page = lineage_markdown(store, "demo", manifests, runs, "Run `run-b` **failed**: RuntimeError: boom", failed=True)
    latest = manifests[-1]
    assert (f"latest committed checkpoint is `{latest.id}` (epoch 2, step 12); Retry resumes there") in page
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert [row.split("|")[1].strip(" `") for row in rows] == [m.id for m in reversed(manifests)]
    assert "run-b-20261128-020000" in rows[0] and "run-a-20261127-020000" in rows[-1]
    assert "file://" not in page and f"`{store.url}/demo/{latest.id}`" in page

    picture = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)\)", page)
    image = Image.open(io.BytesIO(base64.b64decode(picture.group(1))))
    image.load()
    assert image.format == "PNG" and image.size[0] > 300


def test_a_lineage_with_nothing_committed_says_a_retry_starts_from_scratch(tmp_path):
    store = CheckpointStore(str(tmp_path / "store"))
    page = lineage_markdown(store, "empty", [], {}, "failed", failed=True)
    assert "no checkpoint committed yet; Retry starts from scratch" in page


def test_a_failure_inside_a_ray_actor_is_told_by_its_own_error_not_by_rays_wrapper():
    from ray.exceptions import RayTaskError

    from flows.artifacts import error_text

    cause = RuntimeError("injected failure at epoch 1 batch 15")
    wrapped = RayTaskError("ray::WarmGroup.run_block()", "Traceback (most recent call last):\n  File \"x\"\n"
                           f"RuntimeError: {cause}", cause, proctitle="ray::WarmGroup.run_block()", pid=16290,
                           ip="192.0.2.2", actor_repr="<tasks.warm.WarmGroup object at 0x7fe6>",
                           actor_id="5d9f").as_instanceof_cause()
    assert "\x1b[" in str(wrapped) and "pid=16290" in str(wrapped)  # what the page showed before
    assert error_text(wrapped) == "RuntimeError: injected failure at epoch 1 batch 15"
    assert error_text(ValueError("bad\nvalue")) == "ValueError: bad"


def test_a_failed_worker_group_is_told_by_the_error_of_the_rank_that_failed():
    from ray.train import WorkerGroupError

    from flows.artifacts import error_text

    snippet = ("[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n  File \"tasks/faults.py\", line 57\n"
               "RuntimeError: failure injection: rank 0 fails at step of epoch 1 batch 15\n")
    failed = RuntimeError(str(WorkerGroupError(snippet, {0: RuntimeError("failure injection")})))
    assert error_text(failed) == "RuntimeError: failure injection: rank 0 fails at step of epoch 1 batch 15"


def test_the_status_line_tells_a_failure_a_cancel_and_a_preemption_apart():
    from flows.artifacts import failure_status
    from tasks.errors import Preempted

    from ray.exceptions import RayTaskError

    preempted = Preempted(1, 12, "000001-0000000012")
    stop = "preempted at epoch 1 step 12 (step); checkpoint 000001-0000000012 committed; a rerun or Retry resumes there"
    assert str(preempted) == stop
    wrapped = RuntimeError("Training failed on rank 0")
    wrapped.__cause__ = preempted
    across_ray = RayTaskError("ray::train_block()", "Traceback ...", preempted).as_instanceof_cause()
    assert failure_status("run-a", RuntimeError("boom")) == "Run `run-a` **failed**: RuntimeError: boom"
    assert failure_status("run-a", wrapped, cancelled=True) == f"Run `run-a` was **cancelled**: {stop}"
    assert failure_status("run-a", preempted) == f"Run `run-a` **stopped** on a preemption notice: {stop}"
    assert failure_status("run-a", across_ray) == f"Run `run-a` **stopped** on a preemption notice: {stop}"
    # Recognised by type only: the same words in another error's text are a failure.
    assert "**failed**" in failure_status("run-a", RuntimeError(f"Training failed:\n  Preempted: {stop}"))


def test_the_one_line_is_the_workers_own_error_also_when_its_class_name_ends_in_neither_error_nor_exception():
    from flows.artifacts import error_text
    from tasks.errors import GroupFailed

    failed = GroupFailed("the warm worker group ended before epoch 2 was committed: WorkerGroupError: Training "
                         "failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n"
                         "  File \"x.py\", line 1, in f\ntasks.runtime.errors.InjectedFailure: failure injection: "
                         "rank 0 fails at batch of epoch 1 batch 2\n")
    assert error_text(failed) == "InjectedFailure: failure injection: rank 0 fails at batch of epoch 1 batch 2"
    assert error_text(GroupFailed("the warm worker group ended")) == "GroupFailed: the warm worker group ended"
