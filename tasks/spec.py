"""The parameters of one epoch block, as the block task and its Ray Train workers see them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ckpt.retention import RetentionPolicy

from .recipes import RecipeParams


class FailureInjection(BaseModel):
    """Fail on purpose, for tests and drills, at a given point of training.

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
    init_from: str | None = Field(None, description="LINEAGE[@ID|@latest|@best|@ALIAS] to warm-start from.")
    init_mode: Literal["weights", "full"] = "weights"
    sample_log: str | None = Field(None, description="Local folder for a per-rank log of the samples trained.")
    checkpoint_mode: Literal["sync", "async"] = "sync"
    prune: RetentionPolicy | None = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    loop: str | None = Field(None, description="The user's `train_loop(ctx)` as module:attr; None: the recipe loop.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per worker; also the torch thread count.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker (NCCL when > 0, else gloo).")
    datasets: dict[str, str] = Field(default_factory=dict, description="Ray Data sets: name -> module:attr of a "
                                     "function(params) returning a ray.data.Dataset.")
    import_paths: list[str] = Field(default_factory=list, description="Folders made importable in the workers.")
