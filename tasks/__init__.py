"""Prefect tasks that run on Ray: the epoch-block task and the Ray Train worker loop it runs."""

from .block import train_block
from .recipes import Data, Recipe, RecipeParams, load_recipe
from .spec import BlockSpec, FailureInjection

__all__ = ["BlockSpec", "Data", "FailureInjection", "Recipe", "RecipeParams", "load_recipe", "train_block"]
