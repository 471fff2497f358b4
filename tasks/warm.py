"""Worker groups that outlive a block (the warm path).

Ray Train has no way to keep a worker group across `fit()` calls, so a flow run keeps one long
`fit()` per lineage instead, inside a detached actor, `WarmGroup`, that only the flow run's block
tasks talk to:

    block task k  --take_block(spec k)-->  WarmGroup  --command()-->  rank 0 of the workers
                  <--reached E_k--------             <--reached-----  (after committing epoch E_k)

The protocol itself (which block, how far, when the group ends) is `GroupSchedule`
(tasks/group_schedule.py), a plain object the actor wraps; this module adds the actor, its fit,
and the block task's side: finding, starting, watching and replacing the group.

Each block task still says "bring the lineage to epoch E, starting from checkpoint C" and returns
the checkpoint the workers committed, exactly as a fresh `fit()` would. The workers check that the
state they hold is C (the checkpoint they committed last) and reload it from the store when it is
not. Correctness never depends on this path: a missing, dead, stale (other fence or config) or
failed group is replaced by a fresh one, which starts from the store like any block.

A group ends when the flow's last block is done, when its training fails, or by itself when no
block came for `warm_idle_timeout_s` (its flow process died): the workers leave their loop, the
`fit()` returns (Ray removes its placement group) and the actor process exits.

A lost node is the block task's to notice: Ray Train 2.60 does not fail a run whose node died (its
controller restarts the workers, retrying a start that cannot be placed forever), and when the node
held the group's actor, the controller died with it (Ray pins the controller to the node that calls
`fit()`) but its placement group did not: that belongs to the flow run's job, and Ray leaves its
removal to a PlacementGroupCleaner that needs the dashboard's state API, so the group's old bundles,
re-placed on the remaining nodes, kept the CPUs the next fit needed and the block waited for good.
So while it waits, the block task checks its group every WATCH_S seconds: whether the actor
answers, and whether every node that ran the actor or one of its workers is alive (`ray.nodes()`).
When not, it tears the group down (the actor; then `sweep`, in tasks/_group_cleanup.py: the placement
groups of its Ray Train runs and their cleaners; the controller, workers and their helpers go with
those) and raises GroupLost; the block then trains on a fresh `fit()` from the store, which places its workers on the nodes left.
A worker process lost on a live node is still Ray Train's to restart (`max_failures`), inside the group.
A draining node is left to the drain (tasks/runtime/stop.py); but a group whose training failed while one
of its nodes is draining or dead is torn down too, so the retry does not reuse an actor whose node
cannot take the controller of a new fit.
"""

from __future__ import annotations

import math
import os
import uuid

import ray

from ._group_cleanup import sweep
from .errors import GroupLost
from .group_schedule import GroupSchedule
from .runtime import _ray_internals
from .runtime.group import NAMESPACE, BlockCommand, BlockResult, GroupKey, GroupState
from .runtime.spec import BlockSpec
from .runtime.waiting import Poller, wait_for


def group_name(spec: BlockSpec, flow_run: str) -> str:
    return f"baton-warm-{spec.lineage}-{flow_run}"


@ray.remote(num_cpus=0, max_concurrency=8, max_restarts=0)
class WarmGroup:
    """One lineage's worker group for one flow run: its schedule (tasks/group_schedule.py) and
    its fit, on the actor's threads."""

    def __init__(self, key: GroupKey, idle_timeout_s: float):
        self.schedule = GroupSchedule(key, idle_timeout_s, fit=_fit)
        # Exit the actor process once no training runs and the group is done or idle: nothing of
        # the group is left behind.
        Poller(self._exit_if_finished, 1.0, "warm-watchdog").start()

    # ---- the block task's side
    def describe(self) -> GroupState:
        return self.schedule.state(os.getpid(), ray.get_runtime_context().get_node_id())

    def take_block(self, spec: BlockSpec, start_id: str | None) -> BlockResult:
        return self.schedule.take_block(spec, start_id)

    def prestart(self, spec: BlockSpec) -> None:
        self.schedule.prestart(spec)

    def stop(self) -> None:
        self.schedule.stop()

    # ---- rank 0's side, and every worker's (tasks/runtime/group.py)
    def command(self, epochs_done: int, last_id: str | None, pid: int) -> BlockCommand | None:
        return self.schedule.command(epochs_done, last_id, pid)

    def current(self) -> BlockCommand | None:
        return self.schedule.current()

    def note_pid(self, pid: int, node: str | None = None, pg: str | None = None) -> None:
        self.schedule.note_pid(pid, node, pg)

    def _exit_if_finished(self) -> None:
        if self.schedule.finished():
            os._exit(0)


def _fit(spec: BlockSpec) -> None:
    from .trainer import build_trainer

    build_trainer(spec, "warm").fit()


WATCH_S = 2.0  # how often the block task checks its group while it waits


def train_on_group(spec: BlockSpec, start_id: str | None, logger) -> BlockResult:
    """Hand the block to its warm group (`spec.warm_group`), starting (or replacing) it when needed.
    Raises GroupLost (after tearing the group down) when the group cannot finish the block."""
    name = spec.warm_group
    group = _usable_group(name, spec, logger)
    if group is None:
        sweep(name, (), logger)  # what a group of this name that died may have left behind
        group = WarmGroup.options(name=name, namespace=NAMESPACE, lifetime="detached",
                                  get_if_exists=True).remote(GroupKey.of(spec), spec.settings.warm_idle_timeout_s)
    pgs: set[str] = set()
    try:
        return _wait(group, group.take_block.remote(spec, start_id), pgs)
    except GroupLost as err:
        lost = err
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
        lost = GroupLost(f"the warm worker group's actor is gone ({type(err).__name__})")
    except ray.exceptions.RayTaskError:
        # The group's training failed. On a node that is leaving (drained, dead) the group cannot
        # train again: Ray Train pins its controller and dataset manager to the node of the actor.
        leaving = _leaving(group, pgs)
        if not leaving:
            raise  # a training failure: the block fails as before, and its retry reuses the group
        lost = GroupLost(f"node {leaving[:12]} of the warm worker group is leaving and its training failed")
    try:
        ray.kill(group)
    except ray.exceptions.RayError as err:  # already gone
        logger.debug("the lost warm worker group's actor: %s", err)
    sweep(name, pgs, logger)
    raise lost


def _leaving(group, pgs: set[str]) -> str | None:
    """A node of the (answering) group that is draining or dead, if any."""
    try:
        state = ray.get(group.describe.remote(), timeout=30)
    except ray.exceptions.RayError:  # the actor is gone too: cannot tell, the error stands
        return None
    pgs.update(state.pgs)
    gone = set(_ray_internals.draining_nodes()) | {n["NodeID"] for n in ray.nodes() if not n["Alive"]}
    return next(iter(sorted((set(state.nodes) | {state.node}) & gone)), None)


def _wait(group, ref, pgs: set[str]) -> BlockResult:
    """The block's result; every WATCH_S, whether the group's actor answers and whether a node
    that ran it or its workers died. Ray Train 2.60 does not fail a run whose node is lost: its
    controller restarts the workers, and when the controller was on the lost node (it runs where
    the group's actor runs) its placement group outlives it and holds the CPUs a new run needs."""
    def result() -> list[BlockResult] | None:
        ready, _ = ray.wait([ref], timeout=0)
        if ready:
            return [ray.get(ready[0])]
        _check_nodes(group, pgs)
        return None

    # Between checks, wait on the result itself: it returns the moment the block is done. The
    # first check comes after one interval too (a group's actor may be starting still).
    ray.wait([ref], timeout=WATCH_S)
    (done,) = wait_for(result, timeout_s=math.inf, interval_s=WATCH_S,
                       sleep=lambda seconds: ray.wait([ref], timeout=seconds))
    return done


def _check_nodes(group, pgs: set[str]) -> None:
    """Raise GroupLost when a node that ran the group's actor or one of its workers died."""
    state = ray.get(group.describe.remote(), timeout=30)
    pgs.update(state.pgs)
    dead = set(state.nodes) | {state.node}
    dead &= {n["NodeID"] for n in ray.nodes() if not n["Alive"]}
    if dead:
        raise GroupLost(f"node {sorted(dead)[0][:12]} of the warm worker group died")


def _usable_group(name: str, spec: BlockSpec, logger):
    try:
        group = ray.get_actor(name, namespace=NAMESPACE)
        state = ray.get(group.describe.remote(), timeout=30)
    except (ValueError, ray.exceptions.RayError):
        return None  # none yet, or gone
    if state.key.serves(spec):
        return group
    logger.info("the warm worker group of %s was started under another lease or config: replacing it", spec.lineage)
    ray.get(group.stop.remote())
    ray.kill(group)
    _wait_gone(name)
    sweep(name, state.pgs, logger)
    return None


def _gone(name: str) -> bool:
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return True
    return False


def _wait_gone(name: str, timeout_s: float = 30) -> None:
    wait_for(lambda: _gone(name), timeout_s=timeout_s, interval_s=0.2)


def prestart(spec: BlockSpec, options: dict) -> str:
    """Start a worker group for `spec`'s training before its flow run holds the lease (fence not
    yet known): the Ray Train run starts now and its workers wait for the first block. Returns the
    group's name, for the flow's blocks (BlockSpec.warm_group)."""
    name = f"baton-warm-{spec.lineage}-start-{uuid.uuid4().hex[:8]}"
    group = WarmGroup.options(name=name, namespace=NAMESPACE, lifetime="detached", **options).remote(
        GroupKey.of(spec, fence=None), spec.settings.warm_idle_timeout_s)
    group.prestart.remote(spec.model_copy(update={"warm_group": name}))
    return name
