"""The parameters of one epoch block, as the block task and its Ray Train workers see them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .recipes import RecipeParams


class FailureInjection(BaseModel):
    """Fail on purpose, for tests and drills: once per lineage at the given point."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["raise", "kill-worker"] = Field(
        "raise", description="`raise` an exception in the worker, or SIGKILL the worker process.")
    epoch: int = Field(0, ge=0, description="Epoch at which to fail.")
    batch: int = Field(0, ge=0, description="Batch within the epoch before which to fail.")
    rank: int = Field(0, ge=0, description="Which worker fails.")
    times: int = Field(1, ge=1, description="How many times in all the failure fires for this lineage.")


class BlockSpec(BaseModel):
    """Block `index` brings `lineage` to the end of epoch `end_epoch - 1`."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0)
    lineage: str
    start_epoch: int = Field(ge=0)
    end_epoch: int = Field(ge=1)
    store: str
    storage_options: dict[str, Any] = Field(default_factory=dict)
    recipe: str
    params: RecipeParams
    workers: int = Field(ge=1)
    checkpoint_every_steps: int | None = Field(None, ge=1)
    max_failures: int = Field(0, ge=0)
    fence: int = Field(0, ge=0, description="Lease fencing number that commits must still carry.")
    config_hash: str = ""
    fail: FailureInjection | None = None
