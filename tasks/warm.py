"""Worker groups that outlive a block (the warm path).

Ray Train has no way to keep a worker group across `fit()` calls, so a flow run keeps one long
`fit()` per lineage instead, inside a detached actor, `WarmGroup`, that only the flow run's block
tasks talk to:

    block task k  --take_block(spec k)-->  WarmGroup  --command()-->  rank 0 of the workers
                  <--reached E_k--------             <--reached-----  (after committing epoch E_k)

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
When not, it tears the group down (`sweep`: the actor, the placement groups of its Ray Train runs and
their cleaners; the controller, workers and their helpers go with those) and raises GroupLost; the
block then trains on a fresh `fit()` from the store, which places its workers on the nodes left.
A worker process lost on a live node is still Ray Train's to restart (`max_failures`), inside the group.
A draining node is left to the drain (tasks/runtime/stop.py); but a group whose training failed while one
of its nodes is draining or dead is torn down too, so the retry does not reuse an actor whose node
cannot take the controller of a new fit.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid

import ray

from .errors import GroupFailed, GroupLost
from .runtime import _ray_internals
from .runtime.group import NAMESPACE, BlockCommand, BlockResult, GroupKey, GroupState
from .runtime.spec import BlockSpec
from .runtime.waiting import wait_for

log = logging.getLogger("baton.warm")


def group_name(spec: BlockSpec, flow_run: str) -> str:
    return f"baton-warm-{spec.lineage}-{flow_run}"


@ray.remote(num_cpus=0, max_concurrency=8, max_restarts=0)
class WarmGroup:
    """One lineage's worker group for one flow run. Methods run on the actor's threads."""

    def __init__(self, key: GroupKey, idle_timeout_s: float):
        self.key, self.idle_timeout_s = key, idle_timeout_s
        self._cond = threading.Condition()
        self._target: BlockCommand | None = None
        self._reached, self._last_id, self._pids = 0, None, set()
        # Every node that ran one of the group's workers, and every placement group they ran in,
        # for the block task's watch (a lost node) and for the clean-up of a lost group.
        self._nodes: set[str] = set()
        self._pgs: set[str] = set()
        self._fit: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stopping, self._active = False, time.monotonic()
        self._prestarted = False
        threading.Thread(target=self._watchdog, daemon=True, name="warm-watchdog").start()

    # ---- the block task's side
    def describe(self) -> GroupState:
        with self._cond:
            return GroupState(key=self.key, running=self._running(),
                              error=f"{type(self._error).__name__}: {self._error}" if self._error else None,
                              pid=os.getpid(), node=ray.get_runtime_context().get_node_id(),
                              nodes=sorted(self._nodes), pgs=sorted(self._pgs))

    def take_block(self, spec: BlockSpec, start_id: str | None) -> BlockResult:
        """Bring the lineage to the block's end epoch; returns once the workers committed it.
        A training failure is raised as GroupFailed from the error the group's `fit()` raised."""
        with self._cond:
            self._active = time.monotonic()
            if self.key.fence is None:  # prestarted: the first block brings the lease's fence
                self.key = self.key.model_copy(update={"fence": spec.fence})
            self._target = BlockCommand.of(spec, start_id)
            start = not self._running()
            fresh = start or self._reached == 0  # the group's first block (started now, or prestarted)
            if start:
                self._error, self._reached = None, 0
                self._fit = threading.Thread(target=self._train, args=(spec,), daemon=True, name="warm-fit")
                self._fit.start()
            self._cond.notify_all()
            while self._reached < spec.end_epoch and self._running() and not self._error:
                self._cond.wait(1.0)
            self._active = time.monotonic()
            if self._reached >= spec.end_epoch:
                return BlockResult(fresh=fresh, prestarted=fresh and self._prestarted and not start,
                                   pids=sorted(self._pids), checkpoint=self._last_id)
            raise GroupFailed(f"the warm worker group ended before epoch {spec.end_epoch} was committed"
                              + (f": {type(self._error).__name__}: {self._error}" if self._error else "")) \
                from self._error

    def prestart(self, spec: BlockSpec) -> None:
        """Start the Ray Train run now; its workers wait in `join_group` for the first block."""
        with self._cond:
            if not self._running():
                self._prestarted = True
                self._error, self._reached = None, 0
                self._fit = threading.Thread(target=self._train, args=(spec,), daemon=True, name="warm-fit")
                self._fit.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    # ---- rank 0's side
    def command(self, epochs_done: int, last_id: str | None, pid: int) -> BlockCommand | None:
        """The group reached `epochs_done`; wait for a block past it. None: leave the loop."""
        with self._cond:
            self._reached, self._last_id = epochs_done, last_id
            self._pids.add(pid)
            self._cond.notify_all()
            deadline = time.monotonic() + self.idle_timeout_s
            while not self._stopping:
                target = self._target
                if target is not None and target.end_epoch > epochs_done:
                    return target
                if target is not None and target.last:
                    return None  # the flow's last block is done: the group ends with it
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.info("no block for %.0f s: the worker group ends", self.idle_timeout_s)
                    return None
                self._cond.wait(min(remaining, 1.0))
            return None

    def current(self) -> BlockCommand | None:
        """The block in progress, for workers that (re)started inside it."""
        with self._cond:
            return self._target

    def note_pid(self, pid: int, node: str | None = None, pg: str | None = None) -> None:
        with self._cond:
            self._pids.add(pid)
            self._nodes.update([node] if node else [])
            self._pgs.update([pg] if pg else [])

    # ---- inside
    def _running(self) -> bool:
        return self._fit is not None and self._fit.is_alive()

    def _train(self, spec: BlockSpec) -> None:
        from .trainer import build_trainer

        try:
            build_trainer(spec, "warm").fit()
        except BaseException as err:  # handed to the block task waiting in take_block, as it is
            with self._cond:
                self._error = err
        finally:
            with self._cond:
                self._active = time.monotonic()
                self._cond.notify_all()

    def _watchdog(self) -> None:
        """Exit the actor process once no training runs and nothing happened for the idle timeout
        (or at once after the last block): nothing of the group is left behind."""
        while True:
            time.sleep(1.0)
            with self._cond:
                idle = time.monotonic() - self._active
                target = self._target
                done = self._stopping or (target is not None and target.last and self._reached >= target.end_epoch)
                if not self._running() and (done or idle > self.idle_timeout_s):
                    os._exit(0)


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
    while True:
        ready, _ = ray.wait([ref], timeout=WATCH_S)
        if ready:
            return ray.get(ready[0])
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
    key = state.key if state.key.fence is not None else state.key.model_copy(update={"fence": spec.fence})
    if key == GroupKey.of(spec):
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


# ---- clean-up of a lost group -------------------------------------------------------------------

def sweep(name: str, pgs, logger) -> None:
    """Remove what a dead or abandoned group `name` left: the placement groups of its Ray Train
    runs and their PlacementGroupCleaner actors.

    Killing the group's actor takes its TrainController with it (the controller is its child,
    on its node), and the controller's workers, sync actor and dataset manager with that. Not the
    placement group: Ray scopes it to the job (the flow run's driver), which lives on, and leaves
    its removal to a detached PlacementGroupCleaner that asks the state API whether the controller
    died, so on a cluster without a dashboard neither ever goes (the placement group keeps the CPUs
    the next fit needs, the cleaner loops for good). The actors come from the GCS tables, which
    answer without a dashboard; a failure here is logged, never raised."""
    try:
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        actors = _ray_internals.actors()
        groups = {a.worker_id for a in actors if a.name == name and a.class_name == "WarmGroup"}
        controllers = [a for a in actors if a.class_name == _ray_internals.TRAIN_CONTROLLER
                       and a.owner_worker_id in groups]
        creators, known = {a.actor_id for a in controllers}, set(pgs)
        for pg in _ray_internals.placement_groups():
            if (pg.creator_actor_id in creators or pg.id.hex() in known) and not pg.removed:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.id)))
                logger.info("removed placement group %s of the lost warm worker group", pg.id.hex()[:12])
        controller_workers = {a.worker_id for a in controllers}
        for cleaner in actors:
            if cleaner.class_name == _ray_internals.PLACEMENT_GROUP_CLEANER and cleaner.alive \
                    and cleaner.owner_worker_id in controller_workers:
                _kill_actor_process(cleaner.node_id, cleaner.pid, f"ray::{_ray_internals.PLACEMENT_GROUP_CLEANER}")
    except Exception as err:  # noqa: BLE001 - the block falls back to a fresh fit either way; said, not raised
        logger.warning("could not clean up after the lost warm worker group %s: %s: %s", name, type(err).__name__, err)


def _kill_actor_process(node: str, pid: int, title: str) -> None:
    """SIGKILL an actor's process (one this process holds no handle of) on its node; Ray marks the
    actor dead. The process title is checked first: a pid may have been reused."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def kill(pid: int, title: str) -> bool:
        import signal

        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if not f.read().startswith(title.encode()):
                    return False
            os.kill(pid, signal.SIGKILL)
            return True
        except OSError:
            return False

    task = ray.remote(num_cpus=0, max_retries=0)(kill).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
    ray.get(task.remote(pid, title), timeout=60)
