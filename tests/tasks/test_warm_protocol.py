"""The warm worker group's protocol without Ray: `GroupSchedule` (what the `WarmGroup` actor
wraps) driven by block tasks on threads, with a fit whose rank 0 plays the workers' side of the
protocol in-process, on a fake clock; and the typed models of tasks/runtime/group.py."""

from __future__ import annotations

import threading

import pytest
from pydantic import ValidationError

from tasks.errors import GroupFailed
from tasks.group_schedule import GroupSchedule
from tasks.runtime.group import BlockCommand, BlockResult, GroupKey
from tasks.runtime.recipes import RecipeParams
from tasks.runtime.settings import TrainSettings
from tasks.runtime.spec import BlockSpec
from tasks.runtime.waiting import wait_for

IDLE_S = 60.0


def block(index: int, *, fence: int = 3, last: bool = False, **settings) -> BlockSpec:
    return BlockSpec(index=index, lineage="warm", start_epoch=index, end_epoch=index + 1, fence=fence, last=last,
                     config_hash="c0ffee", params=RecipeParams(lr=0.1, batch_size=4, epochs=4),
                     settings=TrainSettings(store="unused", **settings), warm_group="baton-warm-warm-run")


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Workers:
    """A fit of the group, as its rank 0 goes through the protocol: take the block in progress
    (`current`, as worker_loop's join_group does), train it (here: commit `ckpt-E` at once), report
    its end and take the next command (`command`, as fetch_command does), until told to leave."""

    def __init__(self):
        self.schedule: GroupSchedule | None = None
        self.trained: list[tuple[int, int, bool]] = []  # (block, end epoch, reloaded from the store)
        self.fits = 0
        self.fail_at: int | None = None  # the block whose training raises (once)
        self.error: Exception | None = None
        self.hold: dict[int, threading.Event] = {}  # block -> released by the test
        self.holding = threading.Event()

    def fit(self, spec: BlockSpec) -> None:
        self.fits += 1
        pid = 100 + self.fits
        command = wait_for(self.schedule.current, timeout_s=5, interval_s=0.005)
        while command is not None:
            spec = command.applied_to(spec)
            if spec.index in self.hold:
                self.holding.set()
                assert self.hold[spec.index].wait(5)
            if spec.index == self.fail_at:
                self.fail_at, self.error = None, ValueError(f"loss exploded in block {spec.index}")
                raise self.error
            self.trained.append((spec.index, spec.end_epoch, command.reload))
            held = f"ckpt-{spec.end_epoch}"
            command = self.schedule.command(spec.end_epoch, held, pid)
            command = command and command.for_workers_at(held)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def workers() -> Workers:
    return Workers()


def schedule_of(workers: Workers, clock: FakeClock, key: GroupKey | None = None) -> GroupSchedule:
    workers.schedule = GroupSchedule(key or GroupKey.of(block(0)), IDLE_S, workers.fit, clock=clock, tick_s=0.01)
    return workers.schedule


def fit_ends(schedule: GroupSchedule) -> bool:
    return bool(wait_for(lambda: not schedule.state(1, "node").running, timeout_s=5, interval_s=0.005))


def test_each_block_handed_over_is_what_rank_0_trains_and_the_group_ends_after_the_last(workers, clock):
    schedule = schedule_of(workers, clock)
    first = schedule.take_block(block(0), None)
    assert first == BlockResult(fresh=True, prestarted=False, pids=[101], checkpoint="ckpt-1")
    assert schedule.take_block(block(1), "ckpt-1") == BlockResult(fresh=False, prestarted=False, pids=[101],
                                                                  checkpoint="ckpt-2")
    assert not schedule.finished()  # the workers wait for the next block
    assert schedule.take_block(block(2, last=True), "ckpt-2").checkpoint == "ckpt-3"
    assert workers.trained == [(0, 1, False), (1, 2, False), (2, 3, False)] and workers.fits == 1
    assert fit_ends(schedule) and schedule.finished()  # at once: no idle wait after the last block


def test_a_block_that_starts_from_another_checkpoint_makes_the_workers_reload_it(workers, clock):
    schedule = schedule_of(workers, clock)
    schedule.take_block(block(0), None)
    schedule.take_block(block(1, last=True), "ckpt-of-another-run")
    assert workers.trained == [(0, 1, False), (1, 2, True)]


def test_rank_0_leaves_the_loop_after_the_idle_timeout_and_the_group_may_end_one_later(workers, clock):
    schedule = schedule_of(workers, clock)
    schedule.take_block(block(0), None)
    clock.advance(IDLE_S - 1)
    assert not wait_for(lambda: not schedule.state(1, "node").running, timeout_s=0.1, interval_s=0.01)
    clock.advance(2)
    assert fit_ends(schedule)  # no block came for the idle timeout: the workers left
    assert not schedule.finished()  # the actor stays one more idle timeout for a late block
    clock.advance(IDLE_S + 1)
    assert schedule.finished()


def test_a_late_block_after_the_workers_left_starts_a_new_fit(workers, clock):
    schedule = schedule_of(workers, clock)
    schedule.take_block(block(0), None)
    clock.advance(IDLE_S + 1)
    assert fit_ends(schedule)
    result = schedule.take_block(block(1, last=True), "ckpt-1")
    assert (result.fresh, result.pids, workers.fits) == (True, [101, 102], 2)


def test_a_block_whose_fit_failed_raises_group_failed_from_the_original_error_and_a_retry_restarts(
        workers, clock):
    schedule = schedule_of(workers, clock)
    schedule.take_block(block(0), None)
    workers.fail_at = 1
    with pytest.raises(GroupFailed, match="ended before epoch 2 was committed: ValueError: loss exploded") as err:
        schedule.take_block(block(1), "ckpt-1")
    assert err.value.__cause__ is workers.error
    assert schedule.state(1, "node").error == "ValueError: loss exploded in block 1"
    retried = schedule.take_block(block(1, last=True), "ckpt-1")  # Prefect's retry of the block
    assert retried.fresh and workers.fits == 2 and schedule.state(1, "node").error is None
    assert workers.trained == [(0, 1, False), (1, 2, False)]


def test_a_fit_that_ends_without_an_error_before_the_block_end_fails_the_block_without_a_cause(workers, clock):
    schedule = GroupSchedule(GroupKey.of(block(0)), IDLE_S, lambda spec: None, clock=clock, tick_s=0.01)
    with pytest.raises(GroupFailed, match="ended before epoch 1 was committed$") as err:
        schedule.take_block(block(0), None)
    assert err.value.__cause__ is None


def test_a_worker_restarted_inside_a_block_gets_the_block_in_progress(workers, clock):
    schedule = schedule_of(workers, clock)
    schedule.take_block(block(0), None)
    workers.hold[1] = threading.Event()
    taker = threading.Thread(target=schedule.take_block, args=(block(1), "ckpt-1"))
    taker.start()
    assert workers.holding.wait(5)
    in_progress = schedule.current()
    assert in_progress == BlockCommand.of(block(1), "ckpt-1")
    restarted = in_progress.applied_to(block(0))  # a worker whose fit began with block 0
    assert (restarted.index, restarted.end_epoch, restarted.fence) == (1, 2, 3)
    workers.hold[1].set()
    taker.join(5)
    assert not taker.is_alive() and workers.trained[-1] == (1, 2, False)


def test_a_prestarted_group_waits_for_its_first_block_and_takes_its_fence(workers, clock):
    schedule = schedule_of(workers, clock, key=GroupKey.of(block(0), fence=None))
    schedule.prestart(block(0, fence=0))
    assert schedule.state(1, "node").running and workers.trained == []
    result = schedule.take_block(block(0, fence=7), None)
    assert (result.fresh, result.prestarted) == (True, True) and workers.fits == 1
    assert schedule.key.fence == 7
    assert schedule.key.serves(block(1, fence=7)) and not schedule.key.serves(block(1, fence=8))
    assert not schedule.take_block(block(1, fence=7), "ckpt-1").prestarted


def test_a_stopped_group_lets_its_waiting_workers_go_and_ends(workers, clock):
    schedule = schedule_of(workers, clock)
    schedule.take_block(block(0), None)
    schedule.stop()
    assert fit_ends(schedule) and schedule.finished()


def test_the_group_state_names_every_worker_node_and_placement_group(workers, clock):
    schedule = schedule_of(workers, clock)
    schedule.note_pid(7, "node-b", "pg-1")
    schedule.note_pid(8, "node-a", None)
    state = schedule.state(42, "node-c")
    assert (state.pid, state.node, state.nodes, state.pgs, state.running) == (42, "node-c", ["node-a", "node-b"],
                                                                              ["pg-1"], False)
    assert state.key == GroupKey.of(block(0))


# ---- the typed models ----------------------------------------------------------------------------

def test_a_group_key_of_another_fence_or_config_does_not_serve_the_block():
    key = GroupKey.of(block(0))
    assert key.serves(block(5))  # any block of the same training under the same lease
    assert not key.serves(block(1, fence=4))
    assert not key.serves(block(1).model_copy(update={"config_hash": "other"}))
    assert not key.serves(block(1, workers=3))
    assert not key.serves(block(1).model_copy(update={"import_paths": ["/elsewhere"]}))
    assert GroupKey.of(block(0), fence=None).serves(block(1, fence=99))  # prestarted: no lease yet


def test_a_block_command_moves_the_block_and_keeps_the_run():
    command = BlockCommand.of(block(2, fence=5, last=True), "ckpt-2")
    moved = command.applied_to(block(0))
    assert (moved.index, moved.end_epoch, moved.fence, moved.last) == (2, 3, 5, True)
    assert moved.model_dump(exclude={"index", "end_epoch", "fence", "last"}) == \
        block(0).model_dump(exclude={"index", "end_epoch", "fence", "last"})


def test_the_workers_reload_only_when_the_block_starts_from_a_checkpoint_they_do_not_hold():
    assert not BlockCommand.of(block(1), "ckpt-1").for_workers_at("ckpt-1").reload
    assert BlockCommand.of(block(1), "ckpt-1").for_workers_at("ckpt-0").reload
    assert BlockCommand.of(block(1), "ckpt-1").for_workers_at(None).reload
    assert not BlockCommand.of(block(0), None).for_workers_at(None).reload  # from scratch: nothing to load


def test_the_wire_format_is_typed_and_refuses_what_it_does_not_know():
    command = BlockCommand.of(block(1), "ckpt-1")
    assert BlockCommand.model_validate_json(command.model_dump_json()) == command
    with pytest.raises(ValidationError, match="extra"):
        BlockCommand.model_validate({**command.model_dump(), "epochs": 3})
    with pytest.raises(ValidationError):
        BlockCommand.model_validate({**command.model_dump(), "end_epoch": 0})
    with pytest.raises(ValidationError, match="frozen"):
        command.end_epoch = 9
