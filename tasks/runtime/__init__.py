"""The worker runtime: everything that runs inside a Ray Train worker (or in one process, with
`run_local`). The `ctx` API a user's `train_loop(ctx)` calls (`context`), where a block resumes
from (`resume`), rank 0's commit (`commit`), how a preemption notice stops the workers (`stop`),
Baton's collectives, the checkpointed data loader, the worker entry and the built-in recipe loop
(`worker`), the warm group's protocol as the workers see it (`group`), failure injection and the
log relay. It imports no Prefect, and nothing of the block side (`tasks.block`, `tasks.warm`)."""

from importlib import import_module

__all__ = ["BlockSpec", "Preempted", "TaskError", "TrainContext", "TrainSettings", "run_local", "worker_loop"]
_WHERE = {"BlockSpec": "tasks.runtime.spec", "Preempted": "tasks.runtime.errors", "TaskError": "tasks.runtime.errors",
          "TrainContext": "tasks.runtime.context", "TrainSettings": "tasks.runtime.settings",
          "run_local": "tasks.runtime.worker", "worker_loop": "tasks.runtime.worker"}


def __getattr__(name: str):
    # Lazy: the log relay's setup hook imports this package at the start of every worker process.
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(name)
