"""Serve every Baton deployment from one long-lived process (Prefect's `serve`).

- `train/on-demand`: the train flow; its parameter is the training config.
- `nightly-retrain/nightly`: on a schedule, a new lineage per run, named by date and warm-started
  from the previous nightly lineage (deployments.nightly).
- `cleanup/nightly`: on a schedule, prunes the store by a retention policy (its parameters).

`deployments/prefect.yaml` declares the same deployments for `prefect deploy`; a test
(tests/deployments/test_prefect_yaml.py) holds the two to the same names, schedules and parameters.

Flow runs start in subprocesses of the serving process and inherit its environment: PREFECT_API_URL
(the server whose UI shows them) and RAY_ADDRESS (the Ray cluster the blocks train on).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron, Interval
from prefect.types.entrypoint import EntrypointType

from flows.cleanup import CleanupConfig, cleanup
from flows.config import TrainConfig
from flows.train import train

from .nightly import nightly_retrain

__all__ = ["build_deployments", "serve_all"]

DAILY = "%Y%m%d"
TO_THE_SECOND = "%Y%m%d-%H%M%S"
NIGHTLY_CRON = "0 2 * * *"  # 02:00 UTC: retraining and cleanup


def _absolute(store: str) -> str:
    # Flow runs may start in another folder than the one `baton serve` was started from.
    return store if "://" in store else os.path.abspath(os.path.expanduser(store))


def build_deployments(store: str = "./checkpoints", cron: str = NIGHTLY_CRON, interval_s: float | None = None,
                      config: TrainConfig | None = None, cleanup_config: CleanupConfig | None = None,
                      ) -> list[RunnerDeployment]:
    """The three deployments. `config` is the default training config (its store wins over `store`
    when set in it); `interval_s` replaces `cron` for nightly retraining (drills and tests), and then
    lineage names carry the time of day too."""
    config = config or TrainConfig(store=_absolute(store))
    config = config.model_copy(update={"store": _absolute(config.store)})
    train_params: dict[str, Any] = {"config": config.model_dump(mode="json", exclude_none=True)}
    nightly = Interval(timedelta(seconds=interval_s)) if interval_s else Cron(cron, timezone="UTC")
    cleanup_config = cleanup_config or CleanupConfig(store=config.store, storage_options=config.storage_options)
    common: dict[str, Any] = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": ["baton"]}
    return [
        train.to_deployment(name="on-demand", parameters=train_params, **common,
                            description="Train a lineage to `config.epochs`, resuming from its latest checkpoint."),
        nightly_retrain.to_deployment(
            name="nightly", parameters={**train_params, "date_format": TO_THE_SECOND if interval_s else DAILY},
            schedule=nightly, **common,
            description="Each run trains a new lineage named by date, warm-started from the previous nightly lineage."),
        cleanup.to_deployment(name="nightly", schedule=Cron(cron, timezone="UTC"), **common,
                              parameters={"config": cleanup_config.model_dump(mode="json", exclude_none=True)},
                              description="Prune the store by the retention policy in `config.policy`."),
    ]


def serve_all(store: str = "./checkpoints", cron: str = NIGHTLY_CRON, interval_s: float | None = None,
              config: TrainConfig | None = None, limit: int | None = None) -> None:
    """Serve the deployments until interrupted. Schedules stay active when this process stops, so
    a restarted server (or a second serving process) picks them up again."""
    # Prefect 3.9's `serve` pauses every schedule on shutdown unless told not to: a restart would
    # silently stop the nightly runs.
    serve(*build_deployments(store, cron, interval_s, config), pause_on_shutdown=False, limit=limit)
