"""The StopVote on its own (tasks/runtime/stop.py): a notice file in a real store becomes the same
decision on every rank at the same step, one step after it is seen, and `Preempted` names the
checkpoint a rerun resumes from. World size 1, and two real gloo processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from ckpt import CheckpointStore, Lease, Position
from tasks.errors import Preempted
from tasks.runtime.collectives import Collectives
from tasks.runtime.stop import Stop, StopVote, give_notice

AT = Position(epoch=2, batch_in_epoch=5, epoch_complete=False, step=21)


def _vote(store: CheckpointStore, fence: int = 0, lineage: str = "run") -> StopVote:
    vote = StopVote(Collectives(1), rank=0)
    vote.watch(store, lineage, fence, notices=True, drain=False)
    return vote


@pytest.fixture
def store(tmp_path) -> CheckpointStore:
    return CheckpointStore(str(tmp_path))


def test_without_a_notice_every_step_goes_on(store):
    vote = _vote(store)
    try:
        assert [vote.at_step(committable=True, epoch_end_follows=False) for _ in range(5)] == [None] * 5
        assert vote.at_epoch_end() is False
    finally:
        vote.close()


@pytest.mark.parametrize("committable, epoch_end_follows, decision", [
    (True, True, Stop.AT_STEP),  # mid-epoch, through ctx.loader: commit this step
    (False, True, Stop.AFTER_EPOCH),  # the loader's last batch: the epoch-end commit comes next
    (False, False, Stop.WITHOUT_CHECKPOINT),  # no ctx.loader: the step's position cannot be saved
])
def test_a_notice_is_answered_one_step_after_it_is_seen_with_what_the_step_allows(store, committable,
                                                                                 epoch_end_follows, decision):
    give_notice(store, "run", 0, "test")
    vote = _vote(store)  # sees a notice given before the block started at once
    try:
        assert vote.at_step(committable=committable, epoch_end_follows=epoch_end_follows) is None
        assert vote.at_step(committable=committable, epoch_end_follows=epoch_end_follows) is decision
        assert vote.at_epoch_end() is (decision is Stop.AFTER_EPOCH)
    finally:
        vote.close()


def test_a_notice_during_an_epochs_last_step_stops_after_the_epoch_end_commit(store):
    give_notice(store, "run", 0, "test")
    vote = _vote(store)
    try:
        assert vote.at_step(committable=False, epoch_end_follows=True) is None  # the vote is in flight
        assert vote.at_epoch_end() is True
    finally:
        vote.close()


def test_a_notice_to_another_runs_fence_stops_nothing(store):
    with Lease(store, "run", owner="this run") as lease:
        give_notice(store, "run", lease.fence + 1, "meant for the next run")
        vote = _vote(store, lease.fence)
        try:
            assert [vote.at_step(committable=True, epoch_end_follows=False) for _ in range(3)] == [None] * 3
        finally:
            vote.close()


def test_the_next_block_under_a_new_fence_watches_that_fences_notice(store):
    vote = _vote(store, fence=0)
    try:
        with Lease(store, "run", owner="next run") as lease:
            vote.watch(store, "run", lease.fence, notices=True, drain=False)
            give_notice(store, "run", lease.fence, "test")
            vote.watch(store, "run", lease.fence, notices=True, drain=False)  # same fence: the same watcher
            vote.notice._poll()  # what its thread does within 0.1 s, without the wait
            assert vote.at_step(committable=True, epoch_end_follows=False) is None
            assert vote.at_step(committable=True, epoch_end_follows=False) is Stop.AT_STEP
    finally:
        vote.close()


def test_stop_raises_preempted_saying_where_a_rerun_resumes(store):
    vote = _vote(store)
    try:
        with pytest.raises(Preempted) as err:
            vote.stop(AT, "000002-0000000021", saved_s=0.1)
        assert (err.value.epoch, err.value.step, err.value.checkpoint, err.value.where) == \
            (2, 21, "000002-0000000021", "step")
        with pytest.raises(Preempted, match="without a checkpoint of that step .* last committed checkpoint, c1"):
            vote.stop(AT, "c1", where="no checkpoint of the step")
        with pytest.raises(Preempted, match="before the first checkpoint; a rerun or Retry starts over"):
            vote.stop(AT, None)
    finally:
        vote.close()


def _two_ranks(rank: int, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=2)
    store = CheckpointStore(root)
    vote = StopVote(Collectives(2), rank)
    # As in training: only rank 0 watches the store's notices.
    vote.watch(store, "run", 0, notices=rank == 0, drain=False)
    decisions = [vote.at_step(committable=True, epoch_end_follows=False) for _ in range(2)]
    try:
        vote.stop(AT, "c7" if rank == 0 else None)
    except Preempted as err:
        stopped = err.checkpoint
    vote.close()
    dist.destroy_process_group()
    Path(root, f"rank{rank}.json").write_text(json.dumps({"decisions": decisions, "checkpoint": stopped}))


def test_on_two_gloo_ranks_a_notice_only_rank_0_sees_stops_both_at_the_same_step(tmp_path):
    give_notice(CheckpointStore(str(tmp_path)), "run", 0, "test")
    # fork: the children start in milliseconds (spawn re-imports torch: ~10 s here).
    mp.start_processes(_two_ranks, args=(str(tmp_path),), nprocs=2, join=True, start_method="fork")
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"decisions": [None, Stop.AT_STEP.value], "checkpoint": "c7"}
