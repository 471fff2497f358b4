"""The clean-up of a lost or abandoned warm worker group (tasks/warm.py): what Ray leaves behind
when the group's actor dies while the flow run's job lives on."""

from __future__ import annotations

import os

import ray

from .runtime import _ray_internals


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
