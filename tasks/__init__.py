"""Prefect tasks that run on Ray (the epoch-block task, the prune task), the warm worker group and
the block's side of it. The code that runs inside Ray Train workers is `tasks.runtime`."""

from importlib import import_module

__all__ = ["BlockSpec", "Data", "FailureInjection", "LoopError", "Preempted", "Recipe", "RecipeParams", "TaskError",
           "TrainContext", "load_recipe", "run_local", "train_block"]
_WHERE = {"BlockSpec": "tasks.runtime.spec", "FailureInjection": "tasks.runtime.spec", "Data": "tasks.recipes",
          "Recipe": "tasks.recipes", "RecipeParams": "tasks.recipes", "load_recipe": "tasks.recipes",
          "LoopError": "tasks.errors", "Preempted": "tasks.errors", "TaskError": "tasks.errors",
          "TrainContext": "tasks.runtime.context", "run_local": "tasks.runtime.worker", "train_block": "tasks.block"}


def __getattr__(name: str):
    # Lazy, so that validating a config or loading a recipe does not import Prefect and Ray.
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(name)
