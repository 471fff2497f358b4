"""One epoch block: its coordinates in the lineage, and the run's settings, as its workers see them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .recipes import RecipeParams
from .settings import FailureInjection, TrainSettings

__all__ = ["BlockSpec", "FailureInjection"]


class BlockSpec(BaseModel):
    """Block `index` brings `lineage` to the end of epoch `end_epoch - 1`."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0)
    lineage: str
    start_epoch: int = Field(ge=0)
    end_epoch: int = Field(ge=1)
    fence: int = Field(0, ge=0, description="Lease fencing number that commits must still carry.")
    config_hash: str = ""
    params: RecipeParams = Field(description="seed, lr, batch size, epochs, options, recipe defaults resolved.")
    last: bool = Field(False, description="The flow's last block: a warm worker group ends after it.")
    warm_group: str | None = Field(None, description="Name of the warm worker group training this block, if any.")
    import_paths: list[str] = Field(default_factory=list, description="Folders made importable in the workers.")
    settings: TrainSettings
