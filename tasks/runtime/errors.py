"""The errors of Baton's training side, one family: every class derives from `TaskError`.

Every class survives pickling with its message and fields (Ray sends a worker's exception to the
driver pickled). `Preempted` carries where training stopped as fields and formats its message in
one place; code recognises it by type (`preempted_in`), never by its text.
"""

from __future__ import annotations

from typing import Literal


def _rebuild(cls: type, args: tuple, state: dict) -> "TaskError":
    # Bypasses __init__, whose signature differs per class: the message is already in `args`.
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class TaskError(Exception):
    """Root of every error Baton's tasks and worker runtime raise."""

    def __reduce__(self):
        return _rebuild, (type(self), self.args, dict(self.__dict__))


class LoopError(TaskError):
    """The training loop cannot run or cannot be checkpointed as written; the message says how to fix it."""


class NonFiniteMetric(LoopError):
    """A metric (the loss) is NaN or infinite: the block stops before committing anything of it."""


class LoopNotFound(LoopError):
    """`--loop module:attr` names nothing importable, or not a function `train_loop(ctx)`."""


class RecipeError(TaskError, ValueError):
    """`--recipe module:attr` names no usable recipe."""


class CommitFailed(TaskError):
    """Rank 0 could not commit a checkpoint; the other ranks fail with this, naming rank 0's error."""


class InjectedFailure(TaskError):
    """A failure injected on purpose (`--fail`, tests and drills)."""


Where = Literal["step", "end of epoch", "between blocks", "before the first checkpoint", "no checkpoint of the step"]


class Preempted(TaskError):
    """Training stopped on a notice (a signal, a cancel from the Prefect UI, a Ray node drain, the
    lease's holder gone), after committing the step it stopped at when it could.

    `checkpoint` is the id of the newest committed checkpoint (None: nothing committed yet);
    `where` says what it holds; `reason` is why the notice came (`SIGTERM`, a drain's description...; not `cause`, which Ray's
    `RayTaskError` uses for the exception it wraps);
    `drain`: the notice was a Ray node drain, so only that node goes away and the block is retried."""

    def __init__(self, epoch: int = 0, step: int = 0, checkpoint: str | None = None, *, where: Where | None = "step",
                 reason: str = "", drain: bool = False):
        self.epoch, self.step, self.checkpoint = epoch, step, checkpoint
        self.where, self.reason, self.drain = where, reason, drain
        super().__init__(self.describe())

    def describe(self) -> str:
        why = f" ({self.reason})" if self.reason and self.drain else ""
        if self.checkpoint is None:
            return f"preempted at epoch {self.epoch} step {self.step}, before the first checkpoint; a rerun or " \
                   f"Retry starts over{why}"
        if self.where == "no checkpoint of the step":
            return (f"preempted at epoch {self.epoch} step {self.step} without a checkpoint of that step (the loop "
                    f"reads no ctx.loader, so its data position cannot be saved); a rerun or Retry resumes at the "
                    f"last committed checkpoint, {self.checkpoint}{why}")
        at = f" ({self.where})" if self.where else ""  # None: the block side, which knows only the store
        return (f"preempted at epoch {self.epoch} step {self.step}{at}; checkpoint {self.checkpoint} "
                f"committed; a rerun or Retry resumes there{why}")

    def __str__(self) -> str:
        return self.describe()


def preempted_in(error: BaseException | None) -> Preempted | None:
    """The `Preempted` an error is or wraps: Ray's `RayTaskError` (its `cause`), Prefect's and
    Python's chaining (`__cause__`, `__context__`), Ray Train's per-worker failures."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, Preempted):
            inner = getattr(current, "cause", None)
            # Ray's dual class (RayTaskError and Preempted) forwards fields to the real one.
            return inner if isinstance(inner, Preempted) else current
        todo.extend([getattr(current, "cause", None), current.__cause__, current.__context__])
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            todo.extend(v for v in failures.values() if isinstance(v, BaseException))
    return None
