"""The settings of a training run, declared once.

`TrainSettings` is what a block's workers need; `flows.config.TrainConfig` is these plus the flow's
own (lineage, epochs, blocks, retries, lease), and a block's `BlockSpec` carries them unchanged
next to its coordinates. The command line's flags are generated from the fields. Paths and the
warm-start reference are normalised here, in validators, once.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ckpt import InvalidName, RetentionPolicy, validate_name

CheckpointMode = Literal["sync", "async"]
InitMode = Literal["weights", "full"]
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
DEFAULT_RECIPE = "tasks.recipes:linear"


class FailureInjection(BaseModel):
    """Fail on purpose, for tests and drills, at a given point of training (see tasks/faults.py).

    Each firing leaves a marker in the store (`<lineage>/_faults/`), so the failure fires `times`
    times in all for the lineage and the retry that follows can succeed.
    """

    model_config = ConfigDict(extra="forbid")

    action: Literal["raise", "kill-worker"] = Field(
        "raise", description="`raise` an exception in the worker, or SIGKILL the worker process.")
    phase: Literal["batch", "commit"] = Field(
        "batch", description="`batch`: before training batch `batch` of `epoch`; `commit`: while committing "
        "the checkpoint taken after that batch, when its files are written but its manifest is not (rank 0).")
    epoch: int = Field(0, ge=0, description="Epoch at which to fail.")
    batch: int = Field(0, ge=0, description="Batch within the epoch (0-based).")
    rank: int = Field(0, ge=0, description="Which worker fails (the commit phase runs on rank 0).")
    times: int = Field(1, ge=1, description="How many times in all the failure fires for this lineage.")

    @model_validator(mode="after")
    def _commit_runs_on_rank_zero(self) -> "FailureInjection":
        if self.phase == "commit" and self.rank != 0:
            raise ValueError("fail.rank must be 0 for phase 'commit': only rank 0 commits checkpoints")
        return self


def local_path(value: str | None) -> str | None:
    """A local folder made absolute (Ray workers run in other folders); URLs stay as they are."""
    if value is None or "://" in value:
        return value
    return os.path.abspath(os.path.expanduser(value))


class TrainSettings(BaseModel):
    """How to train: store, model or loop, workers and resources, checkpointing, warm start."""

    # Strict: `epochs: true` or `workers: "2"` in a YAML file is an error, not 1 or 2.
    model_config = ConfigDict(extra="forbid", strict=True)

    store: str = Field("./checkpoints", description="Checkpoint store: a local folder or an fsspec URL "
                       "(s3://bucket/prefix).")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for the store "
                                            "(for S3: endpoint_url, key, secret...). Prefer AWS_* environment "
                                            "variables for secrets.")
    workers: int = Field(2, ge=1, le=256, description="Ray Train workers (DDP ranks) per block.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker; also each worker's torch "
                                   "thread count (keep it unchanged across resumes for bit-exact results).")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker: > 0 trains on GPUs with NCCL, "
                                   "0 on CPUs with gloo.")
    recipe: str = Field(DEFAULT_RECIPE, description="Model, data and loss as `module:attr` "
                        "(built in: tasks.recipes:linear, tasks.recipes:digits).")
    loop: str | None = Field(None, description="Your own training loop, `train_loop(ctx)`, as module:attr (the "
                             "current folder is importable); unset: the recipe's built-in loop.")
    options: dict[str, Any] = Field(default_factory=dict, description="Free-form settings for your loop or "
                                    "recipe (ctx.options / params.options); part of the lineage's config hash.")
    datasets: dict[str, str] = Field(default_factory=dict, description="Ray Data sets for the loop's "
                                     "ctx.dataset_shard(name): name -> module:attr of a function(params) "
                                     "returning a ray.data.Dataset.")
    warm_workers: bool = Field(True, description="Keep the worker group alive from one block to the next "
                               "(one Ray Train run per lineage and flow run); off: a fresh fit() per block.")
    warm_idle_timeout_s: float = Field(120.0, gt=0, description="A warm worker group that gets no block for this "
                                       "long (its flow process died) ends by itself.")
    resources_timeout_s: float = Field(60.0, ge=0, description="Seconds a block waits for the Ray cluster to "
                                       "hold the CPUs and GPUs its workers need (an autoscaler adding nodes) "
                                       "before it fails, naming what is missing.")
    seed: int = Field(0, ge=0, description="Seed of model init, data order and every rank's RNG.")
    lr: float | None = Field(None, gt=0, allow_inf_nan=False, description="Learning rate (recipe default when unset).")
    batch_size: int | None = Field(None, ge=1, description="Per-worker batch size (recipe default when unset).")
    checkpoint_every_steps: int | None = Field(None, ge=1, description="Also commit a checkpoint every N "
                                               "optimizer steps (mid-epoch); every epoch always commits.")
    checkpoint_mode: CheckpointMode = Field("sync", description="`async`: training blocks only to snapshot "
                                            "state; writing and committing happen in the background.")
    max_failures: int = Field(1, ge=0, description="Ray Train worker-group restarts within one block.")
    step_timeout_s: float | None = Field(None, gt=0, allow_inf_nan=False, description="A rank that makes no "
                                         "progress (no ctx.step) for this long is stopped and the block fails "
                                         "naming it, then is retried; unset: 20 times the slowest step seen, at "
                                         "least 60 s (300 s before the first steps).")
    placement_strategy: PlacementStrategy = Field(
        "PACK", description="How Ray places the workers over nodes (SPREAD puts them on different nodes).")
    init_from: str | None = Field(None, description="Warm start a new lineage from LINEAGE[@ID|@latest|@best|@ALIAS] "
                                  "in the same store; used only while this lineage has no checkpoint.")
    init_mode: InitMode = Field("weights", description="`weights`: the model only, fresh optimizer; "
                                "`full`: also optimizer, scheduler, custom state and RNG.")
    prune: RetentionPolicy | None = Field(None, description="Prune the lineage by this policy after each commit "
                                          "during training (like Ray Train's num_to_keep); off by default.")
    sample_log: str | None = Field(None, description="Local folder for an audit log of the samples each rank "
                                   "trained on (one JSON line per batch).")
    fail: FailureInjection | None = Field(None, description="Failure injection for tests and drills "
                                          "(also from the BATON_FAIL environment variable, as JSON).")

    @field_validator("store", "sample_log")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return local_path(value)

    @field_validator("init_from")
    @classmethod
    def _init_from_is_safe(cls, value: str | None) -> str | None:
        if value is None:
            return None
        source, _, selector = value.partition("@")
        try:
            validate_name(source, "lineage")
            if selector and selector not in ("latest", "best"):
                validate_name(selector, "checkpoint id or alias")
        except InvalidName as err:
            raise ValueError(f"{err} (init_from is LINEAGE[@ID|@latest|@best|@ALIAS])") from None
        return f"{source}@{selector or 'latest'}"

    @property
    def init_source(self) -> tuple[str, str] | None:
        """(lineage, selector) of the warm start; the selector is an id, latest, best or an alias."""
        if self.init_from is None:
            return None
        source, _, selector = self.init_from.partition("@")
        return source, selector

    @model_validator(mode="after")
    def _failure_rank_exists(self) -> "TrainSettings":
        if self.fail is not None and self.fail.rank >= self.workers:
            raise ValueError(f"fail.rank {self.fail.rank} must be below workers ({self.workers})")
        return self
