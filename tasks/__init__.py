"""Prefect tasks that run on Ray: the epoch-block task, the Ray Train worker loop, recipes."""

from importlib import import_module

__all__ = ["BlockSpec", "Data", "FailureInjection", "Recipe", "RecipeParams", "load_recipe", "train_block"]
_WHERE = {"BlockSpec": "tasks.spec", "FailureInjection": "tasks.spec", "Data": "tasks.recipes",
          "Recipe": "tasks.recipes", "RecipeParams": "tasks.recipes", "load_recipe": "tasks.recipes",
          "train_block": "tasks.block"}


def __getattr__(name: str):
    # Lazy, so that validating a config or loading a recipe does not import Prefect and Ray.
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(name)
