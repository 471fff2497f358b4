"""Errors raised by the checkpoint library. Every message says what to do next."""

from __future__ import annotations


class CheckpointError(Exception):
    """Root of every error `ckpt` raises."""


class InvalidName(CheckpointError, ValueError):
    """A lineage, alias or checkpoint id that could escape the store root or is malformed."""


class CheckpointNotFound(CheckpointError, LookupError):
    """No committed checkpoint matches the request."""


class CheckpointCorrupted(CheckpointError):
    """A committed checkpoint whose files do not match its manifest."""

    def __init__(self, lineage: str, checkpoint_id: str, problems: list[str]):
        self.lineage = lineage
        self.checkpoint_id = checkpoint_id
        self.problems = problems
        super().__init__(
            f"checkpoint {lineage}/{checkpoint_id} failed verification: "
            + "; ".join(problems)
            + ". Resume from an earlier checkpoint, or delete this one with `baton ckpt rm`."
        )


class CheckpointExists(CheckpointError):
    """A checkpoint with this id is already committed with different content."""


class LeaseHeld(CheckpointError):
    """Another live writer holds the lineage's lease."""


class LeaseLost(CheckpointError):
    """This writer's lease was taken over: it may no longer commit (fencing)."""
