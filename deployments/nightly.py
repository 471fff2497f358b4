"""Nightly retraining: each run trains a new lineage named by its date, warm-started from the
latest (or best) checkpoint of the previous nightly lineage in the same store."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from ckpt import CheckpointStore, validate_name
from flows.config import TrainConfig
from flows.served import describe, served
from flows.train import RayRunner, TrainSummary, run_training

__all__ = ["nightly_lineage", "nightly_retrain", "previous_checkpoint"]

WarmStart = Literal["latest", "best", "none"]


def nightly_lineage(prefix: str, date_format: str, when: datetime) -> str:
    """`<prefix>-<when formatted>`, e.g. nightly-20261127; checked as a lineage name."""
    return validate_name(f"{prefix}-{when.astimezone(timezone.utc).strftime(date_format)}", "lineage")


def previous_checkpoint(store: CheckpointStore, prefix: str, lineage: str, warm_start: WarmStart) -> str | None:
    """`LINEAGE@ID` of the newest earlier nightly lineage that has a committed checkpoint.

    Names sort by date (the date format is fixed per deployment), so "earlier" is "sorts before".
    The exact id is returned, not `@latest`, so a retry of this run warm-starts from the same one.
    """
    if warm_start == "none":
        return None
    earlier = [name for name in store.lineages() if name.startswith(f"{prefix}-") and name < lineage]
    for name in reversed(earlier):
        found = store.latest_verified(name) if warm_start == "latest" else store.best(name)
        if found is not None:
            return f"{name}@{found.id}"
    return None


def _scheduled_start() -> datetime:
    # A flow run's expected start time is set once, by its first state: a retry (automatic, or the
    # UI's Retry button) keeps it, so the retried run trains the same lineage.
    when = flow_run.scheduled_start_time
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


@flow(name="nightly-retrain", task_runner=RayRunner(), validate_parameters=True, retries=1, retry_delay_seconds=5)
def nightly_retrain(config: TrainConfig = TrainConfig(), lineage_prefix: str = "nightly",
                    date_format: str = "%Y%m%d", warm_start: WarmStart = "latest") -> TrainSummary:
    """Train `<lineage_prefix>-<date>` by `config`, warm-started from the previous nightly lineage.

    `config.lineage` is ignored; `config.init_from` is used only when no earlier nightly lineage has a
    checkpoint (to seed the first night). Flow retries (1) resume the same lineage from its checkpoints.
    """
    logger = get_run_logger()
    config = served(config)
    lineage = nightly_lineage(lineage_prefix, date_format, _scheduled_start())
    store = CheckpointStore(config.store, config.storage_options)
    init_from = previous_checkpoint(store, lineage_prefix, lineage, warm_start) or config.init_from
    logger.info("nightly retraining of %s, warm start from %s", lineage, init_from or "nothing (from scratch)")
    run_config = TrainConfig.model_validate({**config.model_dump(), "lineage": lineage, "init_from": init_from})
    logger.info("effective config: %s", describe(run_config))
    # The train flow's body runs inside this flow run, so its task runner, logs and artifacts are
    # this run's (a subflow would show up as a second run, and a UI retry would start a new one).
    return run_training(run_config, tags=["nightly"])
