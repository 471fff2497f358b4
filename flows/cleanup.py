"""The `cleanup` flow: prune a store by a retention policy, safely, while training goes on."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ckpt import CheckpointStore, RetentionPlan, RetentionPolicy, prune
from tasks.prune import prune_store

from .config import safe_lineage
from .served import describe, served


class CleanupConfig(BaseModel):
    """Which store (and lineage) to prune, and by which policy."""

    model_config = ConfigDict(extra="forbid")

    store: str = Field("./checkpoints", description="Checkpoint store: a local folder or an fsspec URL.")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for the store.")
    lineage: str | None = Field(None, description="Prune only this lineage (default: every lineage).")
    policy: RetentionPolicy = Field(default_factory=lambda: RetentionPolicy(keep_last=3),
                                    description="What to keep; a checkpoint survives if any rule keeps it.")
    dry_run: bool = Field(False, description="Plan and report, delete nothing.")

    @field_validator("lineage")
    @classmethod
    def _lineage_is_safe(cls, value: str | None) -> str | None:
        return safe_lineage(value)


def _publish(result: RetentionPlan, config: CleanupConfig) -> None:
    rows = [{"lineage": d.lineage, "checkpoint": d.id, "action": d.action, "why": "; ".join(d.reasons),
             "bytes": d.bytes} for d in result.decisions]
    title = "dry run: " if config.dry_run else ""
    create_table_artifact(rows, key="cleanup-decisions",
                          description=f"{title}kept and deleted checkpoints of {config.store}")
    create_markdown_artifact(
        f"### Cleanup of `{config.store}`{' (dry run)' if config.dry_run else ''}\n\n"
        f"- deleted: {len(result.deleted)}\n- kept: {len(result.kept)}\n"
        f"- bytes {'that would be ' if config.dry_run else ''}freed: {result.bytes_freed:,}\n",
        key="cleanup-summary")


def prune_here(config: CleanupConfig) -> RetentionPlan:
    """The same prune as the flow's, in this process with no Prefect run around it: what
    `baton cleanup` does when no Prefect server is configured (a temporary server would take
    10-20 s to start for a prune that takes a fraction of a second, and nobody would see its UI)."""
    store = CheckpointStore(config.store, config.storage_options)
    return prune(store, config.policy, config.lineage, dry_run=config.dry_run)


@flow(name="cleanup")
def cleanup(config: CleanupConfig = CleanupConfig()) -> RetentionPlan:
    """Prune `config.store` by `config.policy`; publishes a table of what was kept and deleted.

    In a deployment run, `config` is merged field by field over the deployment's default config."""
    config = served(config)
    get_run_logger().info("effective config: %s", describe(config))
    result = prune_store(config.store, config.policy, config.lineage, config.dry_run, config.storage_options)
    _publish(result, config)
    return result
