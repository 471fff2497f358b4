"""The `train` flow: a lineage trained in epoch blocks, each a Prefect task on Ray."""

from __future__ import annotations

import os
import time

if os.environ.get("RAY_ADDRESS"):
    # Ray 2.60 clusters have token authentication on, and a driver connecting by address must say
    # so before Ray is imported (runs started by `prefect worker` or `serve` come through here).
    os.environ.setdefault("RAY_AUTH_MODE", "token")

from prefect import flow, get_run_logger  # noqa: E402
from prefect.runtime import flow_run
from prefect_ray import RayTaskRunner
from prefect_ray.context import remote_options
from pydantic import BaseModel

from ckpt import CheckpointRef, CheckpointStore, Lease
from tasks import train_block
from tasks.block import RAY_TRAIN_ENV

from .artifacts import TrainProgress, publish_run
from .config import TrainConfig


class TrainSummary(BaseModel):
    lineage: str
    store: str
    epochs: int
    epochs_trained: int
    blocks_trained: int
    final: CheckpointRef | None
    wall_time_s: float


# Storage credentials and endpoint travel with the job to the Ray workers that read and write the
# store, the way the driver sees them; their values are never logged.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
                 "BATON_FAULT_OMIT_STATE")


def ray_task_runner(address: str | None = None) -> RayTaskRunner:
    """Attach to `address` (or RAY_ADDRESS), else start a local Ray for the run."""
    env = dict(RAY_TRAIN_ENV)
    env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    init_kwargs = {"runtime_env": {"env_vars": env}, "log_to_driver": True}
    return RayTaskRunner(address=address, init_kwargs=init_kwargs)


def _owner() -> str:
    run_id = flow_run.get_id() or "no flow run"
    return f"flow run {flow_run.get_name() or ''} {run_id} ({os.uname().nodename}:{os.getpid()})"


@flow(name="train", task_runner=ray_task_runner(), validate_parameters=True)
def train(config: TrainConfig = TrainConfig()) -> TrainSummary:
    """Train `config.lineage` to `config.epochs` epochs, block by block, resuming from the store."""
    logger = get_run_logger()
    started = time.monotonic()
    lineage = config.resolved_lineage()
    store = CheckpointStore(config.blocks()[0].store, config.storage_options)
    before = store.latest(lineage)  # manifests only: the workers verify what they load
    epochs_before = before.epochs_done if before else 0
    if before is None and config.init_from:
        # Fail before any work when the warm start cannot be found, not inside every Ray worker.
        source, _, selector = config.init_from.partition("@")
        store.resolve(source, selector or "latest")
    logger.info("lineage %s in %s: %d of %d epochs committed", lineage, store.url, epochs_before, config.epochs)
    blocks_trained, ref = 0, store.ref(before) if before else None
    block = train_block.with_options(retries=config.block_retries, retry_delay_seconds=1)
    progress = TrainProgress(lineage, config.epochs, epochs_before)
    with Lease(store, lineage, owner=_owner(), ttl_s=config.lease_ttl_s) as lease:
        for spec in config.blocks(fence=lease.fence):
            done = ref.epochs_done if ref else 0
            # The orchestrating task takes no CPU: the block's Ray Train workers need them all.
            with remote_options(num_cpus=0):
                ref = progress.follow(block.submit(spec), store)
            blocks_trained += ref.epochs_done > done
            if lease.lost is not None:
                raise lease.lost
    summary = TrainSummary(lineage=lineage, store=store.url, epochs=config.epochs,
                           epochs_trained=max(0, (ref.epochs_done if ref else 0) - epochs_before),
                           blocks_trained=blocks_trained, final=ref, wall_time_s=time.monotonic() - started)
    _log_summary(logger, summary)
    publish_run(store, summary)
    return summary


def _log_summary(logger, summary: TrainSummary) -> None:
    final = summary.final
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(final.metrics.items())) if final else "-"
    logger.info(
        "lineage %s: trained %d epoch(s) in %.1f s; now at epoch %d of %d; final metrics: %s; checkpoint %s",
        summary.lineage, summary.epochs_trained, summary.wall_time_s, final.epochs_done if final else 0,
        summary.epochs, metrics, final.uri if final else "-")
