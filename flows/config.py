"""Training configuration: the `config` parameter of the `train` flow.

`TrainConfig` is the run settings (`tasks.runtime.settings.TrainSettings`, what the workers need) plus the
flow's own fields. Field names are the command-line flags (`epochs_per_block`: `--epochs-per-block`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time

from pydantic import BaseModel, Field, field_validator

from ckpt import CheckpointRef, CheckpointStore, InvalidName, validate_name
from tasks.runtime.errors import RecipeError
from tasks.runtime.recipes import RecipeParams, load_recipe
from tasks.runtime.settings import DEFAULT_RECIPE, TrainSettings
from tasks.runtime.spec import BlockSpec

__all__ = ["DEFAULT_RECIPE", "TrainConfig", "TrainSummary", "safe_lineage"]


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


class TrainConfig(TrainSettings):
    """Everything a training run needs. Unset `lr`/`batch_size` take the recipe's defaults."""

    lineage: str | None = Field(None, description="Name of the logical training run; derived from the "
                                "recipe and hyper-parameters when unset, so the same command resumes it.")
    epochs: int = Field(4, ge=1, description="Total epochs the lineage should reach.")
    epochs_per_block: int = Field(2, ge=1, description="Epochs per block (one Prefect task, one Ray Train fit).")
    block_retries: int = Field(1, ge=0, description="Prefect retries of a failed block task.")
    lease_ttl_s: float = Field(30.0, gt=0, description="Seconds without a heartbeat after which the lineage "
                               "lease is stale.")

    @field_validator("lineage")
    @classmethod
    def _lineage_is_safe(cls, value: str | None) -> str | None:
        return safe_lineage(value)

    @field_validator("loop")
    @classmethod
    def _loop_imports(cls, value: str | None) -> str | None:
        if value is not None:
            from tasks.runtime.errors import LoopNotFound
            from tasks.runtime.worker import load_loop

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

    def settings(self) -> TrainSettings:
        """The run settings alone, as every block's workers get them."""
        return TrainSettings.model_validate(self.model_dump(include=set(TrainSettings.model_fields)))

    def recipe_params(self) -> RecipeParams:
        recipe = load_recipe(self.recipe)
        return RecipeParams(seed=self.seed, lr=self.lr or recipe.default_lr,
                            batch_size=self.batch_size or recipe.default_batch_size, epochs=self.epochs,
                            options=self.options)

    def config_hash(self) -> str:
        """What makes two runs the same training: recipe or loop, hyper-parameters and world size."""
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
        if self.loop:
            short = self.loop.split(":", 1)[0].rsplit(".", 1)[-1]
        else:
            short = self.recipe.rsplit(":", 1)[-1]
        return f"{short.replace('_', '-')}-{self.config_hash()[:8]}"

    def blocks(self, fence: int = 0) -> list[BlockSpec]:
        lineage, params, settings, digest = self.resolved_lineage(), self.recipe_params(), self.settings(), self.config_hash()
        starts = range(0, self.epochs, self.epochs_per_block)
        return [
            BlockSpec(index=i, lineage=lineage, start_epoch=start, end_epoch=min(start + self.epochs_per_block, self.epochs),
                      fence=fence, config_hash=digest, params=params, import_paths=[os.getcwd()], settings=settings,
                      last=i == len(starts) - 1)
            for i, start in enumerate(starts)
        ]


class TrainSummary(BaseModel):
    """What a training run did: the `train` flow's result and `baton train`'s last lines."""

    lineage: str
    store: str
    epochs: int
    epochs_trained: int
    blocks_trained: int
    final: CheckpointRef | None
    wall_time_s: float


def already_trained(config: TrainConfig) -> TrainSummary | None:
    """The lineage already has `config.epochs` in a checkpoint that verifies and loads: the answer
    of a rerun, found without starting a Prefect server or Ray."""
    started = time.monotonic()
    store, lineage = CheckpointStore(config.store, config.storage_options), config.resolved_lineage()
    latest = store.latest(lineage)
    if latest is None or latest.epochs_done < config.epochs:
        return None
    from tasks.runtime.resume import newest_good

    good, _ = newest_good(store, lineage)
    if good is None or good.epochs_done < config.epochs:
        return None
    return TrainSummary(lineage=lineage, store=store.url, epochs=config.epochs, epochs_trained=0, blocks_trained=0,
                        final=store.ref(good), wall_time_s=time.monotonic() - started)
