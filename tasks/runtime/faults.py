"""Failure injection for tests and drills: the one place where training fails on purpose.

Two switches, both documented in README ("Drills"):
- `fail` in the training config (or the BATON_FAIL environment variable, as JSON): a
  `FailureInjection` that raises or SIGKILLs a worker before a given batch, or while rank 0 commits
  (files written, manifest not). Each firing leaves a marker in the store, so it fires `times` times
  in all for the lineage and the retry after it succeeds.
- BATON_FAULT_OMIT_STATE=rng,loader: restore leaves that state out, so a drill (or a negative
  control test) can show that exact resume depends on it.

Product code calls `at_batch`, `before_commit` and `omitted`; nothing else reads these switches.
"""

from __future__ import annotations

import logging
import os
import signal

from ckpt import CheckpointStore

from .errors import InjectedFailure
from .spec import FailureInjection

log = logging.getLogger("baton.faults")

OMIT_STATE_ENV = "BATON_FAULT_OMIT_STATE"


def omitted() -> set[str]:
    """State a drill asked restore to leave out (`rng`, `loader`)."""
    return set(filter(None, os.environ.get(OMIT_STATE_ENV, "").split(",")))


def at_batch(fail: FailureInjection | None, store: CheckpointStore, lineage: str, rank: int,
             epoch: int, batch: int) -> None:
    """Before batch `batch` of `epoch` is trained."""
    _maybe_fail(fail, store, lineage, rank, "batch", epoch, batch)


def before_commit(fail: FailureInjection | None, store: CheckpointStore, lineage: str, epoch: int,
                  batch: int) -> None:
    """Rank 0, files of the checkpoint taken after `batch` written, manifest not."""
    _maybe_fail(fail, store, lineage, 0, "commit", epoch, batch)


def _maybe_fail(fail: FailureInjection | None, store: CheckpointStore, lineage: str, rank: int, phase: str,
                epoch: int, batch: int) -> None:
    if fail is None or (fail.phase, fail.epoch, fail.batch, fail.rank) != (phase, epoch, batch, rank):
        return
    # A marker per firing, created exclusively in the store, so a retry does not fail forever.
    fired = any(store.mark_once(lineage, "_faults", f"{phase}-{epoch}-{batch}-{n}") for n in range(fail.times))
    if not fired:
        return
    if fail.action == "kill-worker":
        log.warning("failure injection: SIGKILL of rank %d at %s %d/%d", rank, phase, epoch, batch)
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFailure(f"failure injection: rank {rank} fails at {phase} of epoch {epoch} batch {batch}")
