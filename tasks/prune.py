"""The prune task: apply a retention policy to a store (one lineage or all)."""

from __future__ import annotations

import os
import signal
from typing import Any, Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ckpt import CheckpointStore, RetentionPlan, RetentionPolicy, prune


FAIL_ENV = "BATON_FAIL_CLEANUP_AFTER"


def _kill_after(value: str | None, logger) -> Callable[[], None] | None:
    """Failure injection for tests and drills: `BATON_FAIL_CLEANUP_AFTER=N` SIGKILLs this process
    in the middle of its N-th deletion, when the checkpoint's manifest is gone and its files are
    not. The next cleanup must finish the job."""
    if not value:
        return None
    try:
        limit = int(value)
        if limit < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"{FAIL_ENV}={value!r}: expected a number of deletions >= 1; unset it to "
                         "run cleanup normally") from None
    count = 0

    def after_uncommit() -> None:
        nonlocal count
        count += 1
        if count >= limit:
            logger.warning("%s=%d: killing this process mid-deletion (failure injection)", FAIL_ENV, limit)
            os.kill(os.getpid(), signal.SIGKILL)

    return after_uncommit


@task(name="prune", cache_policy=NO_CACHE)
def prune_store(store: str, policy: RetentionPolicy, lineage: str | None = None, dry_run: bool = False,
                storage_options: dict[str, Any] | None = None) -> RetentionPlan:
    """Plan by `policy` and, unless `dry_run`, delete: manifests first, then files."""
    logger = get_run_logger()
    result = prune(CheckpointStore(store, storage_options), policy, lineage, dry_run=dry_run,
                   after_uncommit=_kill_after(os.environ.get(FAIL_ENV), logger))
    verb = "would delete" if dry_run else "deleted"
    for decision in result.deleted:
        logger.info("%s %s/%s (%s)", verb, decision.lineage, decision.id, "; ".join(decision.reasons))
    logger.info("%s %d checkpoint(s)/leftover(s), kept %d, %s %d bytes", verb, len(result.deleted),
                len(result.kept), "would free" if dry_run else "freed", result.bytes_freed)
    return result
