"""The recipe API and Baton's two built-in recipes, under the import path users name them by
(`--recipe tasks.recipes:digits`); they live in the worker runtime (tasks/runtime/recipes.py)."""

from .runtime.errors import RecipeError
from .runtime.recipes import Data, Recipe, RecipeParams, digits, import_attribute, linear, load_recipe

__all__ = ["Data", "Recipe", "RecipeError", "RecipeParams", "digits", "import_attribute", "linear", "load_recipe"]
