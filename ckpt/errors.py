"""Errors raised by the checkpoint library. Every message says what to do next.

Every class survives pickling with its message and attributes: Ray sends a worker's exception to
the driver pickled, and an exception that cannot be rebuilt there turns into a misleading
`TypeError` about `__init__` arguments."""

from __future__ import annotations


def _rebuild(cls: type, args: tuple, state: dict) -> "CheckpointError":
    # Bypasses __init__, whose signature differs per class: the message is already in `args`.
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class CheckpointError(Exception):
    """Root of every error `ckpt` raises."""

    def __reduce__(self):
        return _rebuild, (type(self), self.args, dict(self.__dict__))


class InvalidName(CheckpointError, ValueError):
    """A lineage, alias or checkpoint id that could escape the store root or is malformed."""


class InvalidArgument(CheckpointError, TypeError, ValueError):
    """A library call made with arguments it cannot work with (a programming error): a value of the
    wrong type or outside what the call accepts. Also a TypeError and a ValueError, as such errors
    were before they had a class of their own."""


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


class CheckpointUndecodable(CheckpointError, ValueError):
    """Checkpoint files whose bytes are not a training state of this format (a planted pickle, a
    torch zip, a state of another Baton version). Their hashes may well match their manifest.

    Also a ValueError, as these were before they had a class of their own."""


class UnreadableFile(CheckpointError, ValueError):
    """A small metadata file of the store (manifest, alias, lease) that cannot be parsed.

    Also a ValueError, as these were before they had a class of their own."""

    def __init__(self, path: str, what: str, reason: str, remedy: str):
        self.path = path
        self.what = what
        self.reason = reason
        super().__init__(f"{path}: unreadable {what} ({reason}). {remedy}")


class ManifestUnreadable(UnreadableFile):
    """A manifest that does not parse or fails its own checksum: its checkpoint is not committed."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, "manifest", reason,
                         "Its checkpoint counts as not committed; remove the folder with `baton ckpt rm` "
                         "or let cleanup remove it as a leftover")


class LeaseUnreadable(UnreadableFile):
    """A lease record that does not parse: nobody can tell whether its holder is alive."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, "lease record", reason,
                         "If no run is training this lineage, delete that file; otherwise wait for the run")


class StoreUnreachable(CheckpointError):
    """The store's server cannot be reached (refused, timed out): a setup problem, told at once."""


class CheckpointExists(CheckpointError):
    """A checkpoint with this id is already committed with different content."""


class LeaseHeld(CheckpointError):
    """Another live writer holds the lineage's lease."""


class LeaseLost(CheckpointError):
    """This writer's lease was taken over: it may no longer commit (fencing)."""


class InvalidFault(CheckpointError, ValueError):
    """A fault-injection setting (`BATON_FAULTS`) that cannot be read."""


class InjectedFault(CheckpointError):
    """Raised at a fault point armed with the `raise` action (drills and tests only)."""
