"""Every error of `tasks`, one family rooted at `TaskError`: the worker runtime's (re-exported
from tasks/runtime/errors.py, where they are raised) and the block side's."""

from __future__ import annotations

from .runtime.errors import (
    CommitFailed,
    InjectedFailure,
    LoopError,
    LoopNotFound,
    NonFiniteMetric,
    Preempted,
    RecipeError,
    TaskError,
    preempted_in,
)

__all__ = ["BlockIncomplete", "CommitFailed", "GroupFailed", "GroupLost", "InjectedFailure", "LoopError",
           "LoopNotFound", "NonFiniteMetric", "NotEnoughResources", "Preempted", "RankHung", "RecipeError", "TaskError",
           "preempted_in"]


class NotEnoughResources(TaskError):
    """The Ray cluster cannot hold the block's workers (Ray Train would wait for them forever)."""


class GroupLost(TaskError):
    """The warm group can no longer train this block: its actor is gone, or a node that ran it or
    its workers died. The group has been torn down; the block starts a fresh fit from the store."""


class GroupFailed(TaskError):
    """The warm group's training ended before the block's end epoch was committed; `__cause__` is
    the error its `fit()` raised, kept as it was."""


class RankHung(TaskError):
    """A rank made no progress for the step timeout: the block failed (and is retried) naming it."""


class BlockIncomplete(TaskError):
    """Training ended without an error but without the block's end-epoch checkpoint."""
