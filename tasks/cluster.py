"""What the Ray cluster can hold for a block, asked before training starts."""

from __future__ import annotations

import time
from typing import Callable

from ckpt import CheckpointStore

from .errors import NotEnoughResources
from .runtime.spec import BlockSpec
from .runtime.waiting import wait_for


def warn_if_store_not_shared(store: CheckpointStore, logger) -> None:
    """A local folder is only seen by the workers of other machines on a shared file system."""
    if not store.is_local:
        return
    import ray

    hosts = sorted({node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")})
    if len(hosts) > 1:
        logger.warning("the store %s is a local folder but the Ray cluster spans %d machines (%s): workers on "
                       "other machines write to their own disks unless this is a shared file system (NFS...). "
                       "Use an S3 store (--store s3://bucket/prefix) for a cluster.", store.url, len(hosts),
                       ", ".join(hosts))


def missing_resources(spec: BlockSpec, total: dict[str, float]) -> dict[str, tuple[float, float]]:
    """What of the block's workers' resources the cluster (`total`) lacks: kind -> (needed, there)."""
    settings = spec.settings
    needed = {"CPU": settings.workers * settings.cpus_per_worker, "GPU": settings.workers * settings.gpus_per_worker}
    return {kind: (amount, total.get(kind, 0.0)) for kind, amount in needed.items() if amount > total.get(kind, 0.0)}


def _cluster_resources() -> dict[str, float]:
    import ray

    return ray.cluster_resources()


def wait_for_resources(spec: BlockSpec, logger, *, total: Callable[[], dict[str, float]] = _cluster_resources,
                       clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
    """Fail in bounded time when the cluster is too small, instead of Ray Train's endless
    "worker group startup timed out" retries; an autoscaler gets `resources_timeout_s` to add nodes.
    `total` is what the cluster holds now (Ray's `cluster_resources`); time comes in as arguments."""
    missing = missing_resources(spec, total())
    if not missing:
        return
    logger.warning("waiting up to %.0f s for the Ray cluster to grow: %s", spec.settings.resources_timeout_s,
                   describe(missing))
    fits = wait_for(lambda: not missing_resources(spec, total()),
                    timeout_s=spec.settings.resources_timeout_s, interval_s=2.0, clock=clock, sleep=sleep)
    if not fits:
        s = spec.settings
        raise NotEnoughResources(
            f"block {spec.index} needs {s.workers} workers x ({s.cpus_per_worker:g} CPU, {s.gpus_per_worker:g} GPU) "
            f"but the Ray cluster has {describe(missing_resources(spec, total()))}: lower --workers, "
            "--cpus-per-worker or --gpus-per-worker, or add nodes to the cluster (--resources-timeout-s waits for "
            "an autoscaler)")


def describe(missing: dict[str, tuple[float, float]]) -> str:
    return ", ".join(f"{have:g} {kind} of the {need:g} needed" for kind, (need, have) in missing.items())
