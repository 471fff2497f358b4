"""Worker groups that outlive a block (the warm path).

Ray Train has no way to keep a worker group across `fit()` calls, so a flow run keeps one long
`fit()` per lineage instead, inside a detached actor, `WarmGroup`, that only the flow run's block
tasks talk to:

    block task k  --run_block(spec k)-->  WarmGroup  --command()-->  rank 0 of the workers
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
A draining node is left to the drain (tasks/preempt.py); but a group whose training failed while one
of its nodes is draining or dead is torn down too, so the retry does not reuse an actor whose node
cannot take the controller of a new fit.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any

import ray

from .spec import BlockSpec

log = logging.getLogger("baton.warm")
NAMESPACE = "baton"


def group_name(spec: BlockSpec, flow_run: str) -> str:
    return f"baton-warm-{spec.lineage}-{flow_run}"


def _key(spec: BlockSpec) -> dict[str, Any]:
    """What a group must share with a block to train it: the same training, under the same lease."""
    return {"lineage": spec.lineage, "fence": spec.fence, "config_hash": spec.config_hash,
            "settings": spec.settings.model_dump(mode="json"), "import_paths": spec.import_paths}


@ray.remote(num_cpus=0, max_concurrency=8, max_restarts=0)
class WarmGroup:
    """One lineage's worker group for one flow run. Methods run on the actor's threads."""

    def __init__(self, key: dict[str, Any], idle_timeout_s: float):
        self.key, self.idle_timeout_s = key, idle_timeout_s
        self._cond = threading.Condition()
        self._target: dict[str, Any] | None = None
        self._reached, self._last_id, self._pids = 0, None, set()
        # Every node that ran one of the group's workers, and every placement group they ran in,
        # for the block task's watch (a lost node) and for the clean-up of a lost group.
        self._nodes: set[str] = set()
        self._pgs: set[str] = set()
        self._fit: threading.Thread | None = None
        self._error: str | None = None
        self._stopping, self._active = False, time.monotonic()
        self._prestarted = False
        threading.Thread(target=self._watchdog, daemon=True, name="warm-watchdog").start()

    # ---- the block task's side
    def describe(self) -> dict[str, Any]:
        with self._cond:
            return {"key": self.key, "running": self._running(), "error": self._error, "pid": os.getpid(),
                    "node": ray.get_runtime_context().get_node_id(), "nodes": sorted(self._nodes),
                    "pgs": sorted(self._pgs)}

    def run_block(self, config: dict[str, Any], start_id: str | None) -> dict[str, Any]:
        """Bring the lineage to the block's end epoch; returns once the workers committed it."""
        spec = BlockSpec.model_validate(config)
        with self._cond:
            self._active = time.monotonic()
            if self.key.get("fence") is None:  # prestarted: the first block brings the lease's fence
                self.key = {**self.key, "fence": spec.fence}
            self._target = {"index": spec.index, "end_epoch": spec.end_epoch, "fence": spec.fence,
                            "start_id": start_id, "last": spec.last}
            start = not self._running()
            fresh = start or self._reached == 0  # the group's first block (started now, or prestarted)
            if start:
                self._error, self._reached = None, 0
                self._fit = threading.Thread(target=self._train, args=(config,), daemon=True, name="warm-fit")
                self._fit.start()
            self._cond.notify_all()
            while self._reached < spec.end_epoch and self._running() and not self._error:
                self._cond.wait(1.0)
            self._active = time.monotonic()
            if self._reached >= spec.end_epoch:
                return {"fresh": fresh, "prestarted": fresh and self._prestarted and not start,
                        "pids": sorted(self._pids), "checkpoint": self._last_id}
            raise RuntimeError(self._error or f"the worker group ended before epoch {spec.end_epoch} was committed")

    def prestart(self, config: dict[str, Any]) -> None:
        """Start the Ray Train run now; its workers wait in `join_group` for the first block."""
        with self._cond:
            if not self._running():
                self._prestarted = True
                self._error, self._reached = None, 0
                self._fit = threading.Thread(target=self._train, args=(config,), daemon=True, name="warm-fit")
                self._fit.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    # ---- rank 0's side
    def command(self, epochs_done: int, last_id: str | None, pid: int) -> dict[str, Any] | None:
        """The group reached `epochs_done`; wait for a block past it. None: leave the loop."""
        with self._cond:
            self._reached, self._last_id = epochs_done, last_id
            self._pids.add(pid)
            self._cond.notify_all()
            deadline = time.monotonic() + self.idle_timeout_s
            while not self._stopping:
                target = self._target
                if target is not None and target["end_epoch"] > epochs_done:
                    return dict(target)
                if target is not None and target["last"]:
                    return None  # the flow's last block is done: the group ends with it
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.info("no block for %.0f s: the worker group ends", self.idle_timeout_s)
                    return None
                self._cond.wait(min(remaining, 1.0))
            return None

    def current(self) -> dict[str, Any] | None:
        """The block in progress, for workers that (re)started inside it."""
        with self._cond:
            return dict(self._target) if self._target else None

    def note_pid(self, pid: int, node: str | None = None, pg: str | None = None) -> None:
        with self._cond:
            self._pids.add(pid)
            self._nodes.update([node] if node else [])
            self._pgs.update([pg] if pg else [])

    # ---- inside
    def _running(self) -> bool:
        return self._fit is not None and self._fit.is_alive()

    def _train(self, config: dict[str, Any]) -> None:
        from ray.train import FailureConfig, RunConfig
        from ray.train.torch import TorchTrainer

        from .block import _datasets, _scaling
        from .worker import worker_loop

        spec = BlockSpec.model_validate(config)
        try:
            TorchTrainer(
                worker_loop, train_loop_config=config, scaling_config=_scaling(spec), datasets=_datasets(spec),
                run_config=RunConfig(name=f"baton-{spec.lineage}-warm-{uuid.uuid4().hex[:8]}",
                                     failure_config=FailureConfig(max_failures=spec.settings.max_failures)),
            ).fit()
        except BaseException as err:  # handed to the block task waiting in run_block
            with self._cond:
                self._error = f"{type(err).__name__}: {err}"
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
                done = self._stopping or (self._target or {}).get("last") and self._reached >= self._target["end_epoch"]
                if not self._running() and (done or idle > self.idle_timeout_s):
                    os._exit(0)


class GroupLost(RuntimeError):
    """The warm group can no longer train this block: its actor is gone, or a node that ran it or
    its workers died. The group has been torn down; the block starts a fresh fit from the store."""


WATCH_S = 2.0  # how often the block task checks its group while it waits


def run_block(spec: BlockSpec, start_id: str | None, flow_run: str, logger) -> dict[str, Any]:
    """Hand the block to the flow run's warm group, starting (or replacing) it when needed.
    Raises GroupLost (after tearing the group down) when the group cannot finish the block."""
    name = spec.warm_group or group_name(spec, flow_run)
    group = _usable_group(name, spec, logger)
    if group is None:
        sweep(name, (), logger)  # what a group of this name that died may have left behind
        group = WarmGroup.options(name=name, namespace=NAMESPACE, lifetime="detached",
                                  get_if_exists=True).remote(_key(spec), spec.settings.warm_idle_timeout_s)
    pgs: set[str] = set()
    try:
        return _wait(group, group.run_block.remote(spec.model_dump(mode="json"), start_id), pgs)
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
    except Exception:  # noqa: BLE001 - already gone
        pass
    sweep(name, pgs, logger)
    raise lost


def _leaving(group, pgs: set[str]) -> str | None:
    """A node of the (answering) group that is draining or dead, if any."""
    try:
        state = ray.get(group.describe.remote(), timeout=30)
        pgs.update(state["pgs"])
        gone = set(ray._private.state.state.get_draining_nodes() or {})
        gone |= {n["NodeID"] for n in ray.nodes() if not n["Alive"]}
    except Exception:  # noqa: BLE001 - cannot tell: the error stands
        return None
    return next(iter(sorted((set(state["nodes"]) | {state["node"]}) & gone)), None)


def _wait(group, ref, pgs: set[str]) -> dict[str, Any]:
    """The block's result; every WATCH_S, whether the group's actor answers and whether a node
    that ran it or its workers died. Ray Train 2.60 does not fail a run whose node is lost: its
    controller restarts the workers, and when the controller was on the lost node (it runs where
    the group's actor runs) its placement group outlives it and holds the CPUs a new run needs."""
    while True:
        ready, _ = ray.wait([ref], timeout=WATCH_S)
        if ready:
            return ray.get(ready[0])
        state = ray.get(group.describe.remote(), timeout=30)
        pgs.update(state["pgs"])
        dead = set(state["nodes"]) | {state["node"]}
        dead &= {n["NodeID"] for n in ray.nodes() if not n["Alive"]}
        if dead:
            raise GroupLost(f"node {sorted(dead)[0][:12]} of the warm worker group died")


def _usable_group(name: str, spec: BlockSpec, logger):
    try:
        group = ray.get_actor(name, namespace=NAMESPACE)
        state = ray.get(group.describe.remote(), timeout=30)
    except (ValueError, ray.exceptions.RayError):
        return None  # none yet, or gone
    key = state["key"] if state["key"].get("fence") is not None else {**state["key"], "fence": spec.fence}
    if key == _key(spec):
        return group
    logger.info("the warm worker group of %s was started under another lease or config: replacing it", spec.lineage)
    ray.get(group.stop.remote())
    ray.kill(group)
    _wait_gone(name)
    sweep(name, state.get("pgs", ()), logger)
    return None


def _wait_gone(name: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.2)


def join_group(spec: BlockSpec) -> BlockSpec | None:
    """A worker (re)starting inside a warm group: note its process, node and placement group, take
    the block in progress (after a worker-group restart that may be a later block than the one the
    fit began with). In a prestarted group, wait for the first block; None: it never came."""
    group = ray.get_actor(spec.warm_group, namespace=NAMESPACE)
    pg = ray.util.get_current_placement_group()
    ray.get(group.note_pid.remote(os.getpid(), ray.get_runtime_context().get_node_id(), pg.id.hex() if pg else None))
    # A prestarted group's workers poll for the first block rather than each holding one of the
    # actor's few concurrent calls while they wait (with many workers the block could not get in).
    deadline = time.monotonic() + spec.settings.warm_idle_timeout_s
    current = ray.get(group.current.remote())
    while current is None:
        if time.monotonic() > deadline:
            return None  # the flow run never began: the group ends untrained
        time.sleep(0.2)
        current = ray.get(group.current.remote())
    return spec.model_copy(update={k: current[k] for k in ("index", "end_epoch", "fence", "last")})


def prestart(spec: BlockSpec, options: dict[str, Any]) -> str:
    """Start a worker group for `spec`'s training before its flow run holds the lease (fence not
    yet known): the Ray Train run starts now and its workers wait for the first block. Returns the
    group's name, for the flow's blocks (BlockSpec.warm_group)."""
    name = f"baton-warm-{spec.lineage}-start-{uuid.uuid4().hex[:8]}"
    group = WarmGroup.options(name=name, namespace=NAMESPACE, lifetime="detached", **options).remote(
        {**_key(spec), "fence": None}, spec.settings.warm_idle_timeout_s)
    group.prestart.remote(spec.model_copy(update={"warm_group": name}).model_dump(mode="json"))
    return name


def fetch_command(name: str, epochs_done: int, last_id: str | None) -> dict[str, Any] | None:
    """Rank 0, at the end of a block: the next block's command, or None when the group ends.
    `reload`: the state the workers hold is not the checkpoint the block starts from."""
    group = ray.get_actor(name, namespace=NAMESPACE)
    command = ray.get(group.command.remote(epochs_done, last_id, os.getpid()))
    if command is not None:
        command["reload"] = command.get("start_id") is not None and command["start_id"] != last_id
    return command


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
        from ray.core.generated import gcs_pb2
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        accessor = ray._private.state.state._connect_and_get_accessor()
        actors = [gcs_pb2.ActorTableData.FromString(b) for b in accessor.get_actor_table(None, None)]
        groups = {a.address.worker_id for a in actors if a.name == name and a.class_name == "WarmGroup"}
        controllers = [a for a in actors if a.class_name == "TrainController" and a.owner_address.worker_id in groups]
        creators = {a.actor_id for a in controllers}
        removed, known = gcs_pb2.PlacementGroupTableData.REMOVED, set(pgs)
        for raw in accessor.get_placement_group_table():
            table = gcs_pb2.PlacementGroupTableData.FromString(raw)
            ours = table.creator_actor_id in creators or table.placement_group_id.hex() in known
            if ours and table.state != removed:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(table.placement_group_id)))
                logger.info("removed placement group %s of the lost warm worker group",
                            table.placement_group_id.hex()[:12])
        controller_workers = {a.address.worker_id for a in controllers}
        alive = gcs_pb2.ActorTableData.ALIVE
        cleaners = [a for a in actors if a.class_name == "PlacementGroupCleaner" and a.state == alive
                    and a.owner_address.worker_id in controller_workers]
        for cleaner in cleaners:
            _kill_actor_process(cleaner.address.node_id.hex(), cleaner.pid, "ray::PlacementGroupCleaner")
    except Exception as err:  # noqa: BLE001 - the block falls back either way
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
