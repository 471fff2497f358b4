"""The `train` flow: a lineage trained in epoch blocks, each a Prefect task on Ray."""

from __future__ import annotations

import logging
import os
import time
from typing import Iterable

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect_ray import RayTaskRunner
from prefect_ray.context import remote_options

from ckpt import CheckpointStore, Lease
from tasks.block import train_block
from tasks.errors import Preempted, preempted_in
from tasks.trainer import RAY_TRAIN_ENV
from tasks.watch import WorkerLogs

from .artifacts import TrainProgress, publish_failure, publish_run
from .config import TrainConfig, TrainSummary
from .served import describe, served
from .signals import on_signals


# Storage credentials and endpoint travel with the job to the Ray workers that read and write the
# store, the way the driver sees them; their values are never logged.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
                 # Google Cloud Storage (gcsfs) and Azure Blob (adlfs): README "Google Cloud Storage",
                 # "Azure Blob Storage"
                 "STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT",
                 "GCSFS_DEFAULT_PROJECT", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_NAME",
                 "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CLIENT_ID",
                 "AZURE_STORAGE_CLIENT_SECRET", "AZURE_STORAGE_TENANT_ID", "AZURE_STORAGE_ANON",
                 "BATON_FAULT_OMIT_STATE")

# The block tasks run in Ray workers, whose Prefect log records are shipped to the API in batches;
# a short interval, and a wait of a little more at the end of the run, make sure the last block's
# lines ("done", "Completed") reach the UI before Ray stops those workers (or the temporary server stops).
WORKER_LOG_BATCH_S = 0.5


def ray_init_kwargs() -> dict:
    """`ray.init` arguments from the environment as it is now: Ray Train settings and the storage
    credentials the workers need."""
    env = dict(RAY_TRAIN_ENV)
    env.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", str(WORKER_LOG_BATCH_S))
    env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    # Every worker process of the job relays its baton.worker lines to the block task (and so to the UI).
    return {"runtime_env": {"env_vars": env, "worker_process_setup_hook": "tasks.runtime.log_relay.install"},
            "log_to_driver": True}


def start_local_ray() -> bool:
    """Start the local Ray a flow run would start (same `ray.init` arguments as `RayRunner`), now:
    `baton train` calls it while the Prefect server starts, so the two starts overlap. The runner
    then uses it; whoever started it shuts it down. False when the run attaches to RAY_ADDRESS or
    Ray is already up."""
    import ray

    if os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return False
    from ._server import STARTUP_S
    from .signals import through_ray_init

    started = time.monotonic()
    with through_ray_init():  # a SIGTERM meanwhile is Baton's to handle, not Ray's sys.exit(15)
        ray.init(namespace="prefect", **ray_init_kwargs())
    STARTUP_S["local Ray"] = time.monotonic() - started
    return True


# lineage -> the warm worker group this process started before its flow run began (`prestart`).
PRESTARTED: dict[str, str] = {}


def prestart_group(config: TrainConfig) -> None:
    """`baton train` on the local Ray it just started: start the lineage's worker group now, while
    the Prefect server boots and the flow run begins, instead of when the first block arrives.
    The workers set up (processes, torch, process group) and wait for the first block's command
    (its fence, end epoch and start checkpoint); a group nobody commands ends after its idle
    timeout. Only with warm workers on; a flow retry under a new lease replaces it as any group."""
    if not config.warm_workers:
        return
    from tasks import warm

    first = config.blocks(fence=0)[0]
    PRESTARTED[config.resolved_lineage()] = warm.prestart(first, own_cluster_options())


def own_cluster_options() -> dict:
    """Ray options that tell a block task (and the Ray Train actors it starts, which inherit its
    runtime env) the address of the cluster it runs on. Without it Ray Train's PlacementGroupCleaner
    asks for address "auto" and, with a second Ray instance on the machine (two runs side by side),
    prints a 26-line traceback "Found multiple active Ray instances" and stops cleaning (Ray 2.60)."""
    import ray

    if not ray.is_initialized():
        return {}
    env = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    if os.environ.get("PREFECT_API_URL"):  # the API of this run, whatever Ray's workers inherited
        env["PREFECT_API_URL"] = os.environ["PREFECT_API_URL"]
    return {"runtime_env": {"env_vars": env}}


class RayRunner(RayTaskRunner):
    """prefect-ray's RayTaskRunner, configured when a flow run starts it rather than when the flow
    is defined: what the workers get is the environment of the run (a served deployment's run,
    say), not of whoever imported this module first. Attaches to RAY_ADDRESS, else starts a local Ray."""

    def __init__(self, address: str | None = None, init_kwargs: dict | None = None):
        super().__init__(address=address, init_kwargs=init_kwargs)
        self._given = dict(init_kwargs or {})

    def duplicate(self) -> "RayRunner":
        return type(self)(address=self.address, init_kwargs=self._given)

    def configure(self) -> "RayRunner":
        """Take the `ray.init` arguments from the environment as it is now."""
        from ._prefect_internals import set_ray_init_kwargs

        set_ray_init_kwargs(self, {"namespace": "prefect", **ray_init_kwargs(), **self._given})
        return self

    def __enter__(self) -> "RayRunner":
        self.configure()
        if os.environ.get("RAY_ADDRESS") and not os.environ.get("RAY_AUTH_MODE"):
            # Ray reads it when imported, so it cannot be set here (Ray 2.60 has token auth on by default).
            logging.getLogger("baton").warning(
                "RAY_ADDRESS is set but RAY_AUTH_MODE is not: a Ray 2.60 cluster with token authentication "
                "refuses this driver. Set RAY_AUTH_MODE=token where the flow run starts (baton train and "
                "baton serve do it themselves; a `prefect worker` needs it exported).")
        entered = super().__enter__()
        from .signals import reclaim

        reclaim()  # ray.init made SIGTERM a sys.exit; `baton train` keeps its own handler
        return entered


def _owner(run_name: str | None) -> str:
    # Kept in the lease's claim records: artifacts read it back to tell which run committed what.
    run_id = flow_run.get_id() or "no flow run"
    return f"flow run {run_name or flow_run.get_name() or ''} {run_id} ({os.uname().nodename}:{os.getpid()})"


def label_flow_run(lineage: str, tags: Iterable[str] = ()) -> str | None:
    """Name the current flow run after its lineage and tag it `lineage:<name>`, so that the UI can
    find every run of a lineage. The name uses the scheduled start, which a retry keeps."""
    run_id = flow_run.get_id()
    if run_id is None:
        return None
    from prefect.client.orchestration import get_client

    name = f"{lineage}-{flow_run.get_scheduled_start_time():%Y%m%d-%H%M%S}"
    try:
        with get_client(sync_client=True) as client:
            current = client.read_flow_run(run_id)
            client.update_flow_run(run_id, name=name,
                                   tags=sorted({*current.tags, "baton", f"lineage:{lineage}", *tags}))
    except Exception as err:  # a label is a convenience: never fail training for it
        get_run_logger().warning("could not name the flow run after lineage %s: %s", lineage, err)
        return None
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is not None and context.flow_run is not None:
        context.flow_run.name = name  # so that prefect.runtime.flow_run.get_name() agrees with the UI
    return name


@flow(name="train", task_runner=RayRunner(), validate_parameters=True)
def train(config: TrainConfig = TrainConfig()) -> TrainSummary:
    """Train `config.lineage` to `config.epochs` epochs, block by block, resuming from the store.

    In a deployment run, `config` is merged field by field over the deployment's default config."""
    config = served(config)
    from ._server import startup_summary

    told = startup_summary()
    if told:
        get_run_logger().info(told)
    get_run_logger().info("effective config: %s", describe(config))
    return run_training(config)


def run_training(config: TrainConfig, tags: Iterable[str] = ()) -> TrainSummary:
    """The train flow's body, also run by the nightly retraining flow inside its own flow run."""
    logger = get_run_logger()
    started = time.monotonic()
    lineage = config.resolved_lineage()
    run_name = label_flow_run(lineage, tags)
    store = CheckpointStore(config.store, config.storage_options)
    before = store.latest(lineage)  # manifests only: the workers verify what they load
    epochs_before = before.epochs_done if before else 0
    if before is None and config.init_from:
        # Fail before any work when the warm start cannot be found, not inside every Ray worker.
        store.resolve(*config.init_source, verified=True)
    logger.info("lineage %s in %s: %d of %d epochs committed", lineage, store.url, epochs_before, config.epochs)
    blocks_trained, ref = 0, store.ref(before) if before else None
    block = train_block.with_options(retries=config.block_retries, retry_delay_seconds=1)
    progress = TrainProgress(lineage, config.epochs, epochs_before)
    stop = None
    try:
        with Lease(store, lineage, owner=_owner(run_name), ttl_s=config.lease_ttl_s) as lease, \
                on_signals(store, lineage, lease.fence, flow_run.get_id()) as stop:
            worker_logs = WorkerLogs.open(logger)  # noqa: F841 - held: the queue lives as long as this run
            for spec in config.blocks(fence=lease.fence):
                if lineage in PRESTARTED and config.warm_workers:
                    spec = spec.model_copy(update={"warm_group": PRESTARTED[lineage]})
                done = ref.epochs_done if ref else 0
                if stop.reason is not None and (ref is None or ref.epochs_done < spec.end_epoch):
                    raise _stopped_between_blocks(store, lineage)
                # The orchestrating task takes no CPU: the block's Ray Train workers need them all.
                with remote_options(num_cpus=0, **own_cluster_options()):
                    ref = progress.follow(block.submit(spec), store)
                blocks_trained += ref.epochs_done > done
                if lease.lost is not None:
                    raise lease.lost
    except Exception as err:
        # Exactly when a person needs them: what is committed, and where a Retry will resume.
        progress.update_from(store)
        publish_failure(store, lineage, config.epochs, err, cancelled=stop is not None and stop.cancelled)
        time.sleep(2 * WORKER_LOG_BATCH_S)  # the failed block's last lines, to the UI
        preempted = preempted_in(err)
        if stop is not None and stop.cancelled and preempted is not None:
            # Cancelled, not Failed: what a person who pressed Cancel expects to read.
            from prefect.states import Cancelled

            logger.warning("cancelled: %s", preempted)
            return Cancelled(message=str(preempted))
        raise
    blocks_done = time.monotonic()
    summary = TrainSummary(lineage=lineage, store=store.url, epochs=config.epochs,
                           epochs_trained=max(0, (ref.epochs_done if ref else 0) - epochs_before),
                           blocks_trained=blocks_trained, final=ref,
                           wall_time_s=blocks_done - started)
    _log_summary(logger, summary)
    publish_run(store, summary)
    # The last block's "done" and "Completed" lines, to the UI: two log batches after the block
    # ended, of which publishing the artifacts (~1 s) already waited part.
    time.sleep(max(0.0, 2 * WORKER_LOG_BATCH_S - (time.monotonic() - blocks_done)))
    return summary


def _stopped_between_blocks(store: CheckpointStore, lineage: str) -> Preempted:
    """A notice that came after a block ended: the next block does not start."""
    latest = store.latest(lineage)
    if latest is None:
        return Preempted()
    return Preempted(latest.epoch, latest.step, latest.id, where="between blocks")


def _log_summary(logger, summary: TrainSummary) -> None:
    final = summary.final
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(final.metrics.items())) if final else "-"
    logger.info(
        "lineage %s: trained %d epoch(s) in %.1f s; now at epoch %d of %d; final metrics: %s; checkpoint %s",
        summary.lineage, summary.epochs_trained, summary.wall_time_s, final.epochs_done if final else 0,
        summary.epochs, metrics, final.uri if final else "-")
