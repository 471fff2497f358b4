"""What a block task shows while its workers train: each checkpoint they commit (and a prune
after it, under a retention policy), and the workers' own `baton.worker` log lines, both through
Prefect's run logger, so they reach the flow run's logs in the UI."""

from __future__ import annotations

from ckpt import CheckpointStore, Manifest, RetentionPolicy, prune

from .runtime.waiting import Poller


def log_checkpoint(logger, manifest: Manifest) -> None:
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in sorted(manifest.metrics.items()))
    where = "end of epoch" if manifest.position.epoch_complete else f"batch {manifest.position.batch_in_epoch} of epoch"
    logger.info("%s %d  step %d  %s  (checkpoint %s)", where, manifest.epoch, manifest.step, metrics, manifest.id)


class WorkerLogs:
    """The job's queue of the workers' `baton.worker` log records (tasks/runtime/log_relay.py): a
    named Ray queue actor that takes no CPU. The train flow opens it first, so that the flow's
    process owns it for the whole run: an actor dies with its owner, and the Ray worker process
    that ran one block task may be reaped as idle (Ray keeps no more idle workers than CPUs)
    before the next block looks the queue up. A block task run without the flow creates its own."""

    def __init__(self):
        from ray.util.queue import Queue

        from .runtime.log_relay import queue_name

        self.queue = Queue(actor_options={"name": queue_name(), "get_if_exists": True, "num_cpus": 0})

    @classmethod
    def open(cls, logger) -> "WorkerLogs | None":
        try:
            return cls()
        except Exception as err:  # noqa: BLE001 - the workers' lines then stay in their own output only
            logger.warning("the workers' log lines are not relayed to this run's log: %s: %s", type(err).__name__, err)
            return None

    def drain(self, logger) -> None:
        waiting = self.queue.qsize()
        for level, message in self.queue.get_nowait_batch(waiting) if waiting else []:
            logger.log(level, "%s", message)


class CommitWatcher:
    """Logs each checkpoint the workers commit, as it appears, and prunes the lineage after each
    commit when the block has a retention policy. With `worker_logs`, also logs what the workers
    log (the resume point first, then the commits). A failed poll (a listing error, a prune that
    failed) is logged as a warning and retried: it never fails the block."""

    def __init__(self, store: CheckpointStore, lineage: str, logger, interval_s: float = 0.5,
                 policy: RetentionPolicy | None = None, worker_logs: WorkerLogs | None = None):
        self.store, self.lineage, self.logger = store, lineage, logger
        self.policy, self.worker_logs = policy, worker_logs
        self.seen = {m.id for m in store.list(lineage)}
        self._poller = Poller(self.poll, interval_s, f"watch-{lineage}", logger=logger)

    def poll(self) -> None:
        if self.worker_logs is not None:
            try:
                self.worker_logs.drain(self.logger)
            except Exception as err:  # noqa: BLE001 - the queue's actor died: commits are still told
                self.logger.warning("the workers' log lines are no longer relayed to this run's log: %s: %s",
                                    type(err).__name__, err)
                self.worker_logs = None
        fresh = [m for m in self.store.list(self.lineage) if m.id not in self.seen]
        for manifest in fresh:
            self.seen.add(manifest.id)
            log_checkpoint(self.logger, manifest)
        if fresh and self.policy is not None:
            result = prune(self.store, self.policy, self.lineage)
            if result.deleted:
                self.logger.info("pruned %s: %s", self.lineage, ", ".join(d.id for d in result.deleted))

    def __enter__(self) -> "CommitWatcher":
        self._poller.start()
        return self

    def __exit__(self, *exc) -> None:
        self._poller.close(join_s=30)
        try:
            self.poll()  # the last commits, which may have come within one interval
        except Exception as err:  # noqa: BLE001 - the log queue's node may be gone: the block's outcome stands
            self.logger.warning("checkpoint watcher, last poll: %s: %s", type(err).__name__, err)
