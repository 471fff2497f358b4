"""The epoch-block Prefect task: bring a lineage to the end of an epoch with Ray Train."""

from __future__ import annotations

import threading
import time
import uuid

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ckpt import CheckpointRef, CheckpointStore, Manifest, RetentionPolicy, prune

from .preempt import DRAIN, Preempted, clean_message, read_notice, withdraw_notice
from .context import newest_good
from .spec import BlockSpec
from .worker import worker_loop

# Ray Train drains each worker's report queue once per health-check interval (2 s by default),
# which makes every `ray.train.report` cost ~2 s; 0.2 s keeps per-epoch reports cheap.
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def _log_checkpoint(logger, manifest: Manifest) -> None:
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in sorted(manifest.metrics.items()))
    where = "end of epoch" if manifest.position.epoch_complete else f"batch {manifest.position.batch_in_epoch} of epoch"
    logger.info("%s %d  step %d  %s  (checkpoint %s)", where, manifest.epoch, manifest.step, metrics, manifest.id)


class _WorkerLogs:
    """The job's queue of the workers' `baton.worker` log records (tasks/_log_relay.py): a named
    Ray queue actor that takes no CPU, created by the first block task that wants it."""

    def __init__(self):
        from ray.util.queue import Queue

        from ._log_relay import queue_name

        self.queue = Queue(actor_options={"name": queue_name(), "get_if_exists": True, "num_cpus": 0})

    @classmethod
    def open(cls, logger) -> "_WorkerLogs | None":
        try:
            return cls()
        except Exception as err:  # the workers' lines then stay in their own output only
            logger.debug("no relay of the workers' log lines: %s", err)
            return None

    def drain(self, logger) -> None:
        waiting = self.queue.qsize()
        for level, message in self.queue.get_nowait_batch(waiting) if waiting else []:
            logger.log(level, "%s", message)


class _CommitWatcher:
    """Logs each checkpoint the workers commit, as it appears, through Prefect's run logger, and
    prunes the lineage after each commit when the block has a retention policy. With `worker_logs`,
    also logs what the workers log (the resume point first, then the commits)."""

    def __init__(self, store: CheckpointStore, lineage: str, logger, interval_s: float = 0.5,
                 policy: RetentionPolicy | None = None, worker_logs: _WorkerLogs | None = None):
        self.store, self.lineage, self.logger, self.interval_s = store, lineage, logger, interval_s
        self.policy, self.worker_logs = policy, worker_logs
        self.seen = {m.id for m in store.list(lineage)}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"watch-{lineage}")

    def _poll(self) -> None:
        if self.worker_logs is not None:
            self.worker_logs.drain(self.logger)
        fresh = [m for m in self.store.list(self.lineage) if m.id not in self.seen]
        for manifest in fresh:
            self.seen.add(manifest.id)
            _log_checkpoint(self.logger, manifest)
        if fresh and self.policy is not None:
            result = prune(self.store, self.policy, self.lineage)
            if result.deleted:
                self.logger.info("pruned %s: %s", self.lineage, ", ".join(d.id for d in result.deleted))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._poll()
            except Exception as err:  # a listing error must not kill the block
                self.logger.debug("checkpoint watcher: %s", err)

    def __enter__(self) -> "_CommitWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._poll()
        except Exception as err:  # nor must a last poll (the log queue's node may be gone): the block's outcome stands
            self.logger.debug("checkpoint watcher: %s", err)


def _warn_if_store_not_shared(store: CheckpointStore, logger) -> None:
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


def _scaling(spec: BlockSpec):
    from ray.train import ScalingConfig

    resources = {"CPU": spec.settings.cpus_per_worker}
    if spec.settings.gpus_per_worker:
        resources["GPU"] = spec.settings.gpus_per_worker
    # use_gpu picks NCCL and puts each worker on its own device (ray.train.torch.get_device()).
    return ScalingConfig(num_workers=spec.settings.workers, use_gpu=spec.settings.gpus_per_worker > 0,
                         resources_per_worker=resources, placement_strategy=spec.settings.placement_strategy)


def _datasets(spec: BlockSpec) -> dict | None:
    """Ray Data sets named in the config, built on the driver and split over the workers by Ray Train."""
    if not spec.settings.datasets:
        return None
    from .worker import _importable, load_loop

    _importable(spec.import_paths)
    return {name: load_loop(path)(spec.params) for name, path in spec.settings.datasets.items()}


class NotEnoughResources(RuntimeError):
    """The Ray cluster cannot hold the block's workers (Ray Train would wait for them forever)."""


def _missing_resources(spec: BlockSpec) -> dict[str, tuple[float, float]]:
    import ray

    total, settings = ray.cluster_resources(), spec.settings
    needed = {"CPU": settings.workers * settings.cpus_per_worker, "GPU": settings.workers * settings.gpus_per_worker}
    return {kind: (amount, total.get(kind, 0.0)) for kind, amount in needed.items() if amount > total.get(kind, 0.0)}


def _wait_for_resources(spec: BlockSpec, logger) -> None:
    """Fail in bounded time when the cluster is too small, instead of Ray Train's endless
    "worker group startup timed out" retries; an autoscaler gets `resources_timeout_s` to add nodes."""
    deadline = time.monotonic() + spec.settings.resources_timeout_s
    missing = _missing_resources(spec)
    if missing:
        logger.warning("waiting up to %.0f s for the Ray cluster to grow: %s", spec.settings.resources_timeout_s,
                       _describe(missing))
    while missing and time.monotonic() < deadline:
        time.sleep(2)
        missing = _missing_resources(spec)
    if missing:
        s = spec.settings
        raise NotEnoughResources(
            f"block {spec.index} needs {s.workers} workers x ({s.cpus_per_worker:g} CPU, {s.gpus_per_worker:g} GPU) "
            f"but the Ray cluster has {_describe(missing)}: lower --workers, --cpus-per-worker or "
            f"--gpus-per-worker, or add nodes to the cluster (--resources-timeout-s waits for an autoscaler)")


def _describe(missing: dict[str, tuple[float, float]]) -> str:
    return ", ".join(f"{have:g} {kind} of the {need:g} needed" for kind, (need, have) in missing.items())


def _preemption(spec: BlockSpec, store: CheckpointStore) -> Preempted | None:
    """The workers stopped on a preemption notice (and committed where they stopped)."""
    notice = read_notice(store, spec.lineage, spec.fence)
    if notice is None:
        return None
    reason = str(notice.get("reason", ""))
    why = f" ({reason})" if reason.startswith(DRAIN) else ""
    latest = store.latest(spec.lineage)
    if latest is None:
        return Preempted(f"preempted at epoch 0 step 0, before the first checkpoint; a rerun or Retry starts over{why}")
    return Preempted(f"preempted at epoch {latest.epoch} step {latest.step}; checkpoint {latest.id} committed; "
                     f"a rerun or Retry resumes there{why}")


def _reached(spec: BlockSpec, store: CheckpointStore) -> CheckpointRef:
    latest = store.latest(spec.lineage)
    if latest is not None and latest.epochs_done >= spec.end_epoch:
        return store.ref(latest)
    preempted = _preemption(spec, store)
    if preempted is not None:
        raise preempted
    raise RuntimeError(f"block {spec.index} finished but {spec.lineage} has no checkpoint at epoch {spec.end_epoch}")


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.get_id()


def _run_warm(spec: BlockSpec, store: CheckpointStore, start: Manifest | None, flow_run: str, logger) -> CheckpointRef | None:
    """The block on the flow run's warm worker group; None when the group was lost (its actor is
    gone, or a node that ran it or its workers died): warm.run_block has torn it down, and the block
    starts a fresh fit from the store."""
    from . import warm

    named = spec.model_copy(update={"warm_group": spec.warm_group or warm.group_name(spec, flow_run)})
    try:
        with _CommitWatcher(store, spec.lineage, logger, policy=spec.settings.prune,
                            worker_logs=_WorkerLogs.open(logger)):
            result = warm.run_block(named, start.id if start else None, flow_run, logger)
    except warm.GroupLost as err:
        preempted = _preemption(spec, store)  # a drained node: the workers stopped on its notice
        if preempted is not None:
            raise preempted from None
        logger.warning("the warm worker group of %s is gone (%s): block %d starts a fresh one from the store",
                       spec.lineage, err, spec.index)
        return None
    except Exception:
        preempted = _preemption(spec, store)
        if preempted is not None:
            raise preempted from None
        raise
    how = ("the worker group started with the run" if result.get("prestarted") else
           "a new worker group" if result["fresh"] else "the warm worker group, no restart")
    logger.info("block %d trained on %s (worker pids %s)", spec.index, how, ", ".join(map(str, result["pids"])))
    return _reached(spec, store)


def run_block(spec: BlockSpec, logger) -> tuple[CheckpointRef, bool]:
    """Train the block unless the store already has it. Returns (latest ref, trained?)."""
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    store = CheckpointStore(spec.settings.store, spec.settings.storage_options)
    # Only a block that would be skipped verifies here; the workers verify what they load.
    latest = store.latest(spec.lineage)
    if latest is not None and latest.epochs_done >= spec.end_epoch:
        # Skipping trusts the newest checkpoint that verifies and loads, never one that does not.
        latest, _ = newest_good(store, spec.lineage)
    if latest is not None and latest.epochs_done >= spec.end_epoch:
        logger.info("block %d: %s already has %d epochs (checkpoint %s): nothing to train",
                    spec.index, spec.lineage, latest.epochs_done, latest.id)
        return store.ref(latest), False
    _warn_if_store_not_shared(store, logger)
    _wait_for_resources(spec, logger)
    start = f"checkpoint {latest.id}" if latest else "scratch"
    logger.info("block %d: training %s epochs %d-%d on %d workers from %s", spec.index, spec.lineage,
                spec.start_epoch, spec.end_epoch - 1, spec.settings.workers, start)
    flow_run = _flow_run_id()
    if spec.settings.warm_workers and flow_run:
        ref = _run_warm(spec, store, latest, flow_run, logger)
        if ref is not None:
            return ref, True
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config=spec.model_copy(update={"warm_group": None}).model_dump(mode="json"),
        scaling_config=_scaling(spec),
        datasets=_datasets(spec),
        run_config=RunConfig(name=f"baton-{spec.lineage}-block{spec.index}-{uuid.uuid4().hex[:8]}",
                             failure_config=FailureConfig(max_failures=spec.settings.max_failures)),
    )
    with _CommitWatcher(store, spec.lineage, logger, policy=spec.settings.prune,
                        worker_logs=_WorkerLogs.open(logger)):
        trainer.fit()
    return _reached(spec, store), True


def _not_preempted(task, task_run, state) -> bool:
    """Prefect's retry condition: a preempted block is not retried (its machine is going away; a
    rerun or a Retry of the flow run resumes at the checkpoint it committed). A block stopped by a
    Ray node drain is: only that node goes away, and Ray places the retry on the others."""
    try:
        state.result()
    except Exception as err:
        message = clean_message(err)
        return message is None or DRAIN in message
    return True


@task(name="train-block", task_run_name="block-{spec.index}", cache_policy=NO_CACHE,
      retry_condition_fn=_not_preempted)
def train_block(spec: BlockSpec) -> CheckpointRef:
    """Bring `spec.lineage` to the end of epoch `spec.end_epoch - 1`, resuming from the store."""
    started = time.monotonic()
    try:
        ref, trained = run_block(spec, get_run_logger())
    except Exception as err:
        message = clean_message(err)
        if message is None:
            raise
        get_run_logger().warning("%s", message)
        if DRAIN in message:
            # The retry (on the nodes that stay) must not read the drain's notice as its own.
            withdraw_notice(CheckpointStore(spec.settings.store, spec.settings.storage_options), spec.lineage, spec.fence)
        raise Preempted(message) from None  # the one line a person needs, not Ray's wrapping
    if trained:
        get_run_logger().info("block %d done in %.1f s: %s", spec.index, time.monotonic() - started, ref.uri)
    return ref
