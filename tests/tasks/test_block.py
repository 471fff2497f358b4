"""The block task's decisions without a Ray cluster or a Prefect server: where a block trains
(`route`), whether Prefect retries it (`retried`), what the store says after training (`stopped`,
`reached`, on a real local store with real notice files), the skip path of
`bring_lineage_to_block_end`, and the cluster-size check on an injected clock."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import ray
import torch
from ray.exceptions import RayTaskError

from ckpt import CheckpointStore, Position, TrainingState, encode
from ckpt.state import MODEL_FILE
from tasks.block import bring_lineage_to_block_end, reached, retried, route, stopped
from tasks.cluster import missing_resources, wait_for_resources
from tasks.errors import BlockIncomplete, NotEnoughResources, Preempted
from tasks.runtime.recipes import RecipeParams
from tasks.runtime.settings import TrainSettings
from tasks.runtime.spec import BlockSpec
from tasks.runtime.stop import DRAIN, give_notice

log = logging.getLogger("test.block")


def block(store: Path | str, index: int = 1, *, end_epoch: int = 2, fence: int = 3, **settings) -> BlockSpec:
    return BlockSpec(index=index, lineage="run", start_epoch=end_epoch - 1, end_epoch=end_epoch, fence=fence,
                     params=RecipeParams(lr=0.1, batch_size=4, epochs=4),
                     settings=TrainSettings(store=str(store), **settings))


def commit_epoch(store: CheckpointStore, epoch: int, *, complete: bool = True, fence: int = 3):
    """A checkpoint of a small model after epoch `epoch` (or in the middle of it)."""
    torch.manual_seed(epoch)
    position = Position(epoch=epoch, batch_in_epoch=8 if complete else 3, epoch_complete=complete,
                        step=8 * epoch + (8 if complete else 3))
    files = encode(TrainingState(model=torch.nn.Linear(3, 2).state_dict(), position=position))
    return store.commit("run", position, files, digest=files.digest, fence=fence)


@pytest.fixture
def store(tmp_path) -> CheckpointStore:
    return CheckpointStore(str(tmp_path))


# ---- route -----------------------------------------------------------------------------------------

def test_a_block_the_store_already_has_is_skipped_whatever_else_is_on(store):
    commit_epoch(store, 1)  # two epochs done
    spec = block(store.url, end_epoch=2)
    assert route(spec, store.latest("run"), "flow-run-1") == "skip"
    assert route(spec.model_copy(update={"end_epoch": 1}), store.latest("run"), None) == "skip"


def test_a_block_trains_on_the_warm_group_only_with_warm_workers_on_and_a_flow_run_to_own_it(store):
    commit_epoch(store, 0)  # one epoch done, the block ends after two
    latest = store.latest("run")
    assert route(block(store.url), latest, "flow-run-1") == "warm"
    assert route(block(store.url), None, "flow-run-1") == "warm"  # from scratch
    assert route(block(store.url), latest, None) == "fresh"  # a task called outside a flow run
    assert route(block(store.url, warm_workers=False), latest, "flow-run-1") == "fresh"


# ---- retried -----------------------------------------------------------------------------------

def wrapped_by_ray(error: BaseException) -> BaseException:
    """`error` as a driver sees it when a Ray task raised it."""
    return RayTaskError("train_block", "Traceback (most recent call last): ...", error).as_instanceof_cause()


def test_prefect_retries_a_block_that_failed_of_anything_but_a_preemption():
    assert retried(RuntimeError("the loss exploded"))
    assert retried(wrapped_by_ray(ValueError("a worker died")))
    assert not retried(Preempted(1, 16, "000001-0000000016", reason="SIGTERM"))


def test_a_preemption_is_recognised_by_type_through_rays_wrapping_and_python_chaining():
    preempted = Preempted(1, 16, "000001-0000000016", reason="SIGTERM")
    assert not retried(wrapped_by_ray(preempted))
    try:
        try:
            raise preempted
        except Preempted as err:
            raise RuntimeError("Ray Train: the worker group failed") from err
    except RuntimeError as chained:
        assert not retried(chained)
    assert retried(RuntimeError("preempted at epoch 1 step 16"))  # the words alone are no preemption


def test_a_preemption_by_a_ray_node_drain_is_retried_on_the_other_nodes():
    drained = Preempted(1, 16, "000001-0000000016", reason=f"{DRAIN}: node going away", drain=True)
    assert retried(drained)
    assert retried(wrapped_by_ray(drained))


def test_prefects_retry_condition_reads_the_error_of_the_failed_state():
    from prefect.states import Failed

    from tasks.block import _retry_condition

    assert not _retry_condition(None, None, Failed(data=Preempted(1, 16, "000001-0000000016")))
    assert _retry_condition(None, None, Failed(data=Preempted(1, 16, "000001-0000000016", drain=True)))
    assert _retry_condition(None, None, Failed(data=RuntimeError("a worker died")))


# ---- stopped and reached -----------------------------------------------------------------------

def test_without_a_notice_the_workers_did_not_stop(store):
    commit_epoch(store, 0)
    assert stopped(block(store.url), store) is None
    give_notice(store, "run", 2, "SIGTERM")  # a notice to the run of another lease
    assert stopped(block(store.url, fence=3), store) is None


def test_a_notice_means_the_workers_stopped_where_the_newest_checkpoint_is(store):
    commit_epoch(store, 0)
    mid = commit_epoch(store, 1, complete=False)
    give_notice(store, "run", 3, "SIGTERM")
    preempted = stopped(block(store.url), store)
    assert (preempted.epoch, preempted.step, preempted.checkpoint) == (1, mid.step, mid.id)
    assert (preempted.reason, preempted.drain) == ("SIGTERM", False)


def test_a_drain_notice_says_so_and_a_notice_before_any_commit_names_no_checkpoint(store):
    give_notice(store, "run", 3, f"{DRAIN}: node n1 is going away")
    preempted = stopped(block(store.url), store)
    assert preempted.drain and preempted.checkpoint is None and "before the first checkpoint" in str(preempted)


def test_a_block_reached_its_end_when_the_store_has_its_end_epoch(store):
    commit_epoch(store, 0)
    end = commit_epoch(store, 1)
    ref = reached(block(store.url, end_epoch=2), store)
    assert (ref.id, ref.epochs_done) == (end.id, 2)


def test_a_block_short_of_its_end_raises_the_preemption_that_stopped_it_or_says_it_ended_early(store):
    commit_epoch(store, 0)
    with pytest.raises(BlockIncomplete, match="block 1 finished but run has no checkpoint at epoch 2"):
        reached(block(store.url), store)
    give_notice(store, "run", 3, "SIGTERM")
    with pytest.raises(Preempted, match="preempted at epoch 0 step 8"):
        reached(block(store.url), store)


# ---- the skip path -----------------------------------------------------------------------------

def test_a_block_the_store_has_returns_its_checkpoint_without_training_or_touching_ray(store):
    assert not ray.is_initialized()
    commit_epoch(store, 0)
    end = commit_epoch(store, 1)
    ref, trained = bring_lineage_to_block_end(block(store.url, end_epoch=2), log, "flow-run-1")
    assert (ref.id, trained) == (end.id, False)
    assert not ray.is_initialized()


def test_skipping_trusts_the_newest_checkpoint_that_loads_never_a_damaged_one(store, caplog):
    commit_epoch(store, 0)
    good = commit_epoch(store, 1)
    damaged = commit_epoch(store, 2)
    path = Path(store.path("run", damaged.id, MODEL_FILE))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        ref, trained = bring_lineage_to_block_end(block(store.url, end_epoch=2), log, "flow-run-1")
    assert (ref.id, trained) == (good.id, False)
    assert f"skipping checkpoint run/{damaged.id}" in caplog.text
    assert not ray.is_initialized()


# ---- the cluster's size ------------------------------------------------------------------------

class FakeTime:
    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_missing_resources_names_each_kind_the_cluster_lacks_with_needed_and_there(tmp_path):
    spec = block(tmp_path, workers=2, cpus_per_worker=1.5)
    assert missing_resources(spec, {"CPU": 4.0}) == {}
    assert missing_resources(spec, {"CPU": 2.0}) == {"CPU": (3.0, 2.0)}
    gpus = block(tmp_path, workers=4, gpus_per_worker=1)
    assert missing_resources(gpus, {"CPU": 8.0, "GPU": 2.0}) == {"GPU": (4.0, 2.0)}
    assert missing_resources(gpus, {"CPU": 8.0}) == {"GPU": (4.0, 0.0)}


def test_a_cluster_big_enough_starts_the_block_at_once(tmp_path, caplog):
    time = FakeTime()
    with caplog.at_level(logging.WARNING, logger="test.block"):
        wait_for_resources(block(tmp_path), log, total=lambda: {"CPU": 2.0}, clock=time.clock, sleep=time.sleep)
    assert time.sleeps == [] and caplog.text == ""


def test_a_cluster_that_grows_in_time_starts_the_block_once_it_fits(tmp_path, caplog):
    time = FakeTime()
    with caplog.at_level(logging.WARNING, logger="test.block"):
        wait_for_resources(block(tmp_path, resources_timeout_s=60), log,
                           total=lambda: {"CPU": 1.0 if time.now < 5 else 2.0}, clock=time.clock, sleep=time.sleep)
    assert time.sleeps == [2.0, 2.0, 2.0]  # found big enough at the third look, at 6 s
    assert "waiting up to 60 s for the Ray cluster to grow: 1 CPU of the 2 needed" in caplog.text


def test_a_cluster_too_small_fails_the_block_after_the_timeout_saying_what_to_change(tmp_path):
    time = FakeTime()
    with pytest.raises(NotEnoughResources, match=r"needs 2 workers x \(1 CPU, 0 GPU\) but the Ray cluster has "
                                                 r"1 CPU of the 2 needed: lower --workers"):
        wait_for_resources(block(tmp_path, resources_timeout_s=5), log, total=lambda: {"CPU": 1.0},
                           clock=time.clock, sleep=time.sleep)
    assert sum(time.sleeps) == pytest.approx(5.0)
