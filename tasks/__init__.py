"""Prefect tasks that run on Ray (the epoch-block task, the prune task) and the worker side: the
`ctx` API a user's `train_loop(ctx)` uses, the built-in recipe loop, the Ray Train worker entry."""

from importlib import import_module

__all__ = ["BlockSpec", "Data", "FailureInjection", "LoopError", "Recipe", "RecipeParams", "TrainContext",
           "load_recipe", "run_local", "train_block"]
_WHERE = {"BlockSpec": "tasks.spec", "FailureInjection": "tasks.spec", "Data": "tasks.recipes",
          "Recipe": "tasks.recipes", "RecipeParams": "tasks.recipes", "load_recipe": "tasks.recipes",
          "LoopError": "tasks.context", "TrainContext": "tasks.context", "run_local": "tasks.worker",
          "train_block": "tasks.block"}


def __getattr__(name: str):
    # Lazy, so that validating a config or loading a recipe does not import Prefect and Ray.
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(name)
