"""The epoch-block Prefect task, and every decision a block makes: skip (the store already has
it), train on the flow run's warm worker group, or train on a fresh `fit()`; and what a stop on
a preemption notice means for Prefect's retries."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator, Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ckpt import CheckpointRef, CheckpointStore, Manifest

from .cluster import wait_for_resources, warn_if_store_not_shared
from .errors import BlockIncomplete, GroupLost, Preempted, RankHung, preempted_in
from .runtime.resume import newest_good
from .runtime.spec import BlockSpec
from .runtime.stop import DRAIN, read_notice, withdraw_notice
from .runtime.watchdog import clear_reports, describe_hang, read_reports
from .watch import CommitWatcher, WorkerLogs

Route = Literal["skip", "warm", "fresh"]


def route(spec: BlockSpec, latest: Manifest | None, flow_run: str | None) -> Route:
    """Where block `spec` trains, given the lineage's newest good checkpoint: `skip` when it already
    reaches the block's end (blocks are idempotent), else on the flow run's warm worker group when
    warm workers are on and there is a flow run to own one, else on a fresh `fit()`."""
    if latest is not None and latest.epochs_done >= spec.end_epoch:
        return "skip"
    if spec.settings.warm_workers and flow_run:
        return "warm"
    return "fresh"


def stopped(spec: BlockSpec, store: CheckpointStore) -> Preempted | None:
    """The workers stopped on a preemption notice (and committed where they stopped), or None."""
    notice = read_notice(store, spec.lineage, spec.fence)
    if notice is None:
        return None
    reason = str(notice.get("reason", ""))
    latest = store.latest(spec.lineage)
    return Preempted(latest.epoch if latest else 0, latest.step if latest else 0, latest.id if latest else None,
                     where=None, reason=reason, drain=reason.startswith(DRAIN))


def failed_because(spec: BlockSpec, store: CheckpointStore, since: float) -> Preempted | RankHung | None:
    """Why the workers' training failed, when Baton knows better than the error Ray raised: they
    stopped on a preemption notice (a hang during a notice ends at the last committed checkpoint),
    or a rank hung (tasks/runtime/watchdog.py: the ranks' reports, written after `since`)."""
    preempted = stopped(spec, store)
    if preempted is not None:
        return preempted
    hung = describe_hang(read_reports(store, spec.lineage, spec.fence, since), spec.settings.workers)
    if hung is None:
        return None
    clear_reports(store, spec.lineage, spec.fence)
    return RankHung(hung)


def reached(spec: BlockSpec, store: CheckpointStore) -> CheckpointRef:
    """The block's end-epoch checkpoint, once training returned; else why there is none."""
    latest = store.latest(spec.lineage)
    if latest is not None and latest.epochs_done >= spec.end_epoch:
        return store.ref(latest)
    preempted = stopped(spec, store)
    if preempted is not None:
        raise preempted
    raise BlockIncomplete(f"block {spec.index} finished but {spec.lineage} has no checkpoint at epoch "
                          f"{spec.end_epoch}: the training loop ended early; its log says why")


def bring_lineage_to_block_end(spec: BlockSpec, logger, flow_run: str | None = None) -> tuple[CheckpointRef, bool]:
    """Train the block unless the store already has it. Returns (latest ref, trained?)."""
    store = CheckpointStore(spec.settings.store, spec.settings.storage_options)
    # Only a block that would be skipped verifies here; the workers verify what they load.
    latest = store.latest(spec.lineage)
    if latest is not None and latest.epochs_done >= spec.end_epoch:
        # Skipping trusts the newest checkpoint that verifies and loads, never one that does not.
        latest, _ = newest_good(store, spec.lineage)
    how = route(spec, latest, flow_run)
    if how == "skip":
        logger.info("block %d: %s already has %d epochs (checkpoint %s): nothing to train",
                    spec.index, spec.lineage, latest.epochs_done, latest.id)
        return store.ref(latest), False
    warn_if_store_not_shared(store, logger)
    wait_for_resources(spec, logger)
    logger.info("block %d: training %s epochs %d-%d on %d workers from %s", spec.index, spec.lineage,
                spec.start_epoch, spec.end_epoch - 1, spec.settings.workers,
                f"checkpoint {latest.id}" if latest else "scratch")
    if how == "warm":
        ref = _train_warm(spec, store, latest, flow_run, logger)
        if ref is not None:
            return ref, True
    return _train_fresh(spec, store, logger), True


def _train_warm(spec: BlockSpec, store: CheckpointStore, start: Manifest | None, flow_run: str,
                logger) -> CheckpointRef | None:
    """The block on the flow run's warm worker group; None when the group was lost (its actor is
    gone, or a node that ran it or its workers died): it has been torn down, and the block starts
    a fresh fit from the store."""
    from . import warm

    named = spec.model_copy(update={"warm_group": spec.warm_group or warm.group_name(spec, flow_run)})
    try:
        # A lost group whose workers stopped on a drained node's notice is told as that Preempted.
        with _told_why_it_failed(spec, store), CommitWatcher(store, spec.lineage, logger, policy=spec.settings.prune,
                                                              worker_logs=WorkerLogs.open(logger)):
            result = warm.train_on_group(named, start.id if start else None, logger)
    except GroupLost as err:
        logger.warning("the warm worker group of %s is gone (%s): block %d starts a fresh one from the store",
                       spec.lineage, err, spec.index)
        return None
    how = ("the worker group started with the run" if result.prestarted else
           "a new worker group" if result.fresh else "the warm worker group, no restart")
    logger.info("block %d trained on %s (worker pids %s)", spec.index, how, ", ".join(map(str, result.pids)))
    return reached(spec, store)


def _train_fresh(spec: BlockSpec, store: CheckpointStore, logger) -> CheckpointRef:
    from .trainer import build_trainer

    trainer = build_trainer(spec.model_copy(update={"warm_group": None}), f"block{spec.index}")
    with _told_why_it_failed(spec, store), CommitWatcher(store, spec.lineage, logger, policy=spec.settings.prune,
                                                          worker_logs=WorkerLogs.open(logger)):
        trainer.fit()
    return reached(spec, store)


@contextlib.contextmanager
def _told_why_it_failed(spec: BlockSpec, store: CheckpointStore) -> Iterator[None]:
    """Training that fails is re-raised as what Baton knows it was (`failed_because`): a Preempted
    (the one line a person needs, not Ray's wrapping) or a RankHung (from the error it caused)."""
    since = time.time()
    try:
        yield
    except Exception as err:
        known = failed_because(spec, store, since)
        if known is None:
            raise
        raise known from (None if isinstance(known, Preempted) else err)


def retried(error: BaseException) -> bool:
    """Whether Prefect retries a block that failed with `error`. A preempted block is not (its
    machine is going away; a rerun or a Retry of the flow run resumes at the checkpoint it
    committed), except after a Ray node drain: only that node goes away, and Ray places the retry
    on the others."""
    preempted = preempted_in(error)
    return preempted is None or preempted.drain


def _retry_condition(task, task_run, state) -> bool:
    try:
        state.result()
    except Exception as err:
        return retried(err)
    return True


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.get_id()


@task(name="train-block", task_run_name="block-{spec.index}", cache_policy=NO_CACHE,
      retry_condition_fn=_retry_condition)
def train_block(spec: BlockSpec) -> CheckpointRef:
    """Bring `spec.lineage` to the end of epoch `spec.end_epoch - 1`, resuming from the store."""
    started = time.monotonic()
    try:
        try:
            ref, trained = bring_lineage_to_block_end(spec, get_run_logger(), _flow_run_id())
        except Exception as err:
            preempted = preempted_in(err)
            if preempted is None:
                raise
            get_run_logger().warning("%s", preempted)
            if preempted.drain:
                # The retry (on the nodes that stay) must not read the drain's notice as its own.
                withdraw_notice(CheckpointStore(spec.settings.store, spec.settings.storage_options), spec.lineage,
                                spec.fence)
            raise preempted from None  # the one line a person needs, not Ray's wrapping
        if trained:
            get_run_logger().info("block %d done in %.1f s: %s", spec.index, time.monotonic() - started, ref.uri)
        return ref
    finally:
        _ship_logs()


def _ship_logs() -> None:
    """Send this task's queued log records to the Prefect API before the task returns. The task
    runs in a Ray worker, whose Prefect handler ships records in batches every few seconds: the
    flow (and `baton train`'s terminal, which reads the API a last time when the flow returns)
    would otherwise miss the block's last lines. Prefect's API handler's `flush` (the stdlib
    interface) sends what is queued and waits, at most 5 s."""
    for handler in logging.getLogger("prefect.task_runs").handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - the lines stay queued and go with the next batch
            pass
