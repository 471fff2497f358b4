"""Training configuration: one pydantic model, the `config` parameter of the `train` flow.

Field names match the command-line flags (`epochs_per_block` for `--epochs-per-block`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ckpt import RetentionPolicy, validate_name
from ckpt.errors import InvalidName
from tasks.recipes import RecipeError, RecipeParams, load_recipe
from tasks.spec import BlockSpec, FailureInjection

DEFAULT_RECIPE = "tasks.recipes:linear"


@contextlib.contextmanager
def _cwd_importable():
    """A user's loop in the current folder imports, as with `python -m`."""
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        yield
    finally:
        if added and os.getcwd() in sys.path:
            sys.path.remove(os.getcwd())


def safe_lineage(value: str | None) -> str | None:
    """A pydantic validator body: a user's lineage name must not escape the store root."""
    if value is not None:
        try:
            validate_name(value, "lineage")
        except InvalidName as err:
            raise ValueError(str(err)) from None
    return value


class TrainConfig(BaseModel):
    """Everything a training run needs. Unset `lr`/`batch_size` take the recipe's defaults."""

    model_config = ConfigDict(extra="forbid")

    lineage: str | None = Field(None, description="Name of the logical training run; derived from the "
                                "recipe and hyper-parameters when unset, so the same command resumes it.")
    store: str = Field("./checkpoints", description="Checkpoint store: a local folder or an fsspec URL (s3://bucket/prefix).")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for the store "
                                            "(for S3: endpoint_url, key, secret...). Prefer AWS_* environment variables for secrets.")
    epochs: int = Field(4, ge=1, description="Total epochs the lineage should reach.")
    epochs_per_block: int = Field(2, ge=1, description="Epochs per block (one Prefect task, one Ray Train fit).")
    workers: int = Field(2, ge=1, le=256, description="Ray Train workers (DDP ranks) per block.")
    recipe: str = Field(DEFAULT_RECIPE, description="Model, data and loss as `module:attr` "
                        "(built in: tasks.recipes:linear, tasks.recipes:digits).")
    seed: int = Field(0, ge=0, description="Seed of model init, data order and every rank's RNG.")
    lr: float | None = Field(None, gt=0, description="Learning rate (recipe default when unset).")
    batch_size: int | None = Field(None, ge=1, description="Per-worker batch size (recipe default when unset).")
    checkpoint_every_steps: int | None = Field(None, ge=1, description="Also commit a checkpoint every N "
                                               "optimizer steps (mid-epoch); every epoch always commits.")
    max_failures: int = Field(1, ge=0, description="Ray Train worker-group restarts within one block.")
    block_retries: int = Field(1, ge=0, description="Prefect retries of a failed block task.")
    lease_ttl_s: float = Field(30.0, gt=0, description="Seconds without a heartbeat after which the lineage lease is stale.")
    init_from: str | None = Field(None, description="Warm start a new lineage from LINEAGE[@ID|@latest|@best|@ALIAS] "
                                  "in the same store; used only while this lineage has no checkpoint.")
    init_mode: Literal["weights", "full"] = Field("weights", description="`weights`: the model only, fresh optimizer; "
                                                  "`full`: also optimizer, scheduler, custom state and RNG.")
    fail: FailureInjection | None = Field(None, description="Failure injection for tests and drills "
                                          "(also from the BATON_FAIL environment variable, as JSON).")
    checkpoint_mode: Literal["sync", "async"] = Field("sync", description="`async`: training blocks only to "
                                                     "snapshot state; writing and committing happen in the background.")
    prune: RetentionPolicy | None = Field(None, description="Prune the lineage by this policy after each commit "
                                          "during training (like Ray Train's num_to_keep); off by default.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers over nodes (SPREAD puts them on different nodes).")
    sample_log: str | None = Field(None, description="Local folder for an audit log of the samples each rank "
                                   "trained on (one JSON line per batch).")
    loop: str | None = Field(None, description="Your own training loop, `train_loop(ctx)`, as module:attr (the "
                             "current folder is importable); unset: the recipe's built-in loop.")
    options: dict[str, Any] = Field(default_factory=dict, description="Free-form settings for your loop or "
                                    "recipe (ctx.options / params.options); part of the lineage's config hash.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker; also each worker's torch "
                                   "thread count (keep it unchanged across resumes for bit-exact results).")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker: > 0 trains on GPUs with NCCL, "
                                   "0 on CPUs with gloo.")
    datasets: dict[str, str] = Field(default_factory=dict, description="Ray Data sets for the loop's "
                                     "ctx.dataset_shard(name): name -> module:attr of a function(params) "
                                     "returning a ray.data.Dataset.")

    @field_validator("lineage")
    @classmethod
    def _lineage_is_safe(cls, value: str | None) -> str | None:
        return safe_lineage(value)

    @field_validator("init_from")
    @classmethod
    def _init_from_is_safe(cls, value: str | None) -> str | None:
        if value is not None:
            source, _, selector = value.partition("@")
            try:
                validate_name(source, "lineage")
                if selector and selector not in ("latest", "best"):
                    validate_name(selector, "checkpoint id or alias")
            except InvalidName as err:
                raise ValueError(f"{err} (init_from is LINEAGE[@ID|@latest|@best|@ALIAS])") from None
        return value

    @field_validator("loop")
    @classmethod
    def _loop_imports(cls, value: str | None) -> str | None:
        if value is not None:
            from tasks.worker import LoopNotFound, load_loop

            try:
                with _cwd_importable():
                    load_loop(value)
            except LoopNotFound as err:
                raise ValueError(str(err)) from None
        return value

    @field_validator("recipe")
    @classmethod
    def _recipe_loads(cls, value: str) -> str:
        try:
            load_recipe(value)
        except RecipeError as err:
            raise ValueError(str(err)) from None
        return value

    @model_validator(mode="after")
    def _blocks_fit(self) -> "TrainConfig":
        if self.fail is not None and self.fail.rank >= self.workers:
            raise ValueError(f"fail.rank {self.fail.rank} must be below workers ({self.workers})")
        return self

    def recipe_params(self) -> RecipeParams:
        recipe = load_recipe(self.recipe)
        return RecipeParams(seed=self.seed, lr=self.lr or recipe.default_lr,
                            batch_size=self.batch_size or recipe.default_batch_size, epochs=self.epochs,
                            options=self.options)

    def config_hash(self) -> str:
        """What makes two runs the same training: recipe, hyper-parameters and world size."""
        key = {"recipe": self.recipe, "params": self.recipe_params().model_dump(exclude={"epochs"}),
               "workers": self.workers}
        if self.loop:
            key.update(loop=self.loop, cpus_per_worker=self.cpus_per_worker)
        if self.init_from:
            key.update(init_from=self.init_from, init_mode=self.init_mode)
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def resolved_lineage(self) -> str:
        if self.lineage:
            return self.lineage
        short = (self.loop or self.recipe).rsplit(":", 1)[-1].replace("_", "-")
        if self.loop:
            short = self.loop.split(":", 1)[0].rsplit(".", 1)[-1].replace("_", "-")
        return f"{short}-{self.config_hash()[:8]}"

    def blocks(self, fence: int = 0) -> list[BlockSpec]:
        lineage, params = self.resolved_lineage(), self.recipe_params()
        # Ray workers run in their own folders: a relative store path must be made absolute here.
        store = self.store if "://" in self.store else os.path.abspath(os.path.expanduser(self.store))
        return [
            BlockSpec(index=i, lineage=lineage, start_epoch=start,
                      end_epoch=min(start + self.epochs_per_block, self.epochs), store=store,
                      storage_options=self.storage_options, recipe=self.recipe, params=params,
                      workers=self.workers, checkpoint_every_steps=self.checkpoint_every_steps,
                      max_failures=self.max_failures, fence=fence, config_hash=self.config_hash(),
                      fail=self.fail, init_from=self.init_from, init_mode=self.init_mode,
                      sample_log=self.sample_log and os.path.abspath(self.sample_log),
                      checkpoint_mode=self.checkpoint_mode, placement_strategy=self.placement_strategy,
                      prune=self.prune, loop=self.loop, cpus_per_worker=self.cpus_per_worker,
                      gpus_per_worker=self.gpus_per_worker, datasets=self.datasets, import_paths=[os.getcwd()])
            for i, start in enumerate(range(0, self.epochs, self.epochs_per_block))
        ]
