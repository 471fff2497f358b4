"""The prune task: apply a retention policy to a store (one lineage or all)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ckpt import CheckpointStore, RetentionPlan, RetentionPolicy, prune


@task(name="prune", cache_policy=NO_CACHE)
def prune_store(store: str, policy: RetentionPolicy, lineage: str | None = None, dry_run: bool = False,
                storage_options: dict[str, Any] | None = None) -> RetentionPlan:
    """Plan by `policy` and, unless `dry_run`, delete: manifests first, then files."""
    logger = get_run_logger()
    result = prune(CheckpointStore(store, storage_options), policy, lineage, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    for decision in result.deleted:
        logger.info("%s %s/%s (%s)", verb, decision.lineage, decision.id, "; ".join(decision.reasons))
    for decision in result.decisions:
        if decision.problems:
            logger.warning("%s/%s is damaged (%s): %s", decision.lineage, decision.id, decision.action,
                           "; ".join(decision.problems))
    logger.info("%s %d checkpoint(s)/leftover(s), kept %d, %s %d bytes", verb, len(result.deleted),
                len(result.kept), "would free" if dry_run else "freed", result.bytes_freed)
    return result
