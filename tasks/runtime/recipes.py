"""Recipes: the user's model, data, loss and optimizer, named by import path (`module:attr`).

Baton ships two: `tasks.recipes:linear` (the classic two-class example on synthetic data, the
default) and `tasks.recipes:digits` (an MLP on scikit-learn's bundled digits data set).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from pydantic import BaseModel, Field
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from .errors import RecipeError


class RecipeParams(BaseModel):
    """What a recipe's builders see of the training configuration."""

    seed: int = 0
    lr: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    epochs: int = Field(ge=1)
    options: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class Data:
    train: Dataset
    validation: Dataset | None = None


@dataclass(frozen=True)
class Recipe:
    """How to build and train one model. Only `build_model` and `build_data` are required."""

    build_model: Callable[[RecipeParams], nn.Module]
    build_data: Callable[[RecipeParams], Data]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy
    build_optimizer: Callable[[Any, RecipeParams], torch.optim.Optimizer] = (
        lambda params, p: torch.optim.SGD(params, lr=p.lr))
    build_scheduler: Callable[[torch.optim.Optimizer, RecipeParams], Any] | None = None
    evaluate: Callable[[nn.Module, Dataset], dict[str, float]] | None = None
    default_lr: float = 0.01
    default_batch_size: int = 16
    # Called after every optimizer step (an EMA update, a curriculum counter...).
    after_step: Callable[[nn.Module], None] | None = None
    # Custom state saved and restored with the checkpoint: tensors and JSON values only.
    extra_state: Callable[[nn.Module], dict[str, Any]] | None = None
    load_extra_state: Callable[[nn.Module, dict[str, Any]], None] | None = None
    description: str = field(default="")


def import_attribute(path: str, what: str, example: str, error: type[Exception]) -> Any:
    """`module:attr` imported (the user's recipe, loop or data set); `error` names what is wrong."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise error(f"{what} {path!r} is not of the form 'module:attr' (for example {example!r})")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # a syntax error or a failing import in the user's module: theirs to fix
        raise error(f"{what} {path!r}: cannot import module {module_name!r} ({type(err).__name__}: {err}); "
                    "is it in the current folder or on PYTHONPATH, and does it import on its own?") from None
    target = getattr(module, attr, None)
    if target is None:
        raise error(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}")
    return target


def load_recipe(path: str) -> Recipe:
    """Import `module:attr`; the attribute is a `Recipe` or a no-argument function returning one."""
    target = import_attribute(path, "recipe", "tasks.recipes:digits", RecipeError)
    if isinstance(target, Recipe):
        return target
    return _call_factory(path, target)


def _call_factory(path: str, target: Any) -> Recipe:
    """A recipe factory is a Python function taking no argument. Anything else (a builtin such as
    `sys.exit` or `os.system`, a class, a function that needs arguments) is refused uncalled."""
    if not inspect.isfunction(target) or any(
            p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            for p in inspect.signature(target).parameters.values()):
        raise RecipeError(f"recipe {path!r} is a {type(target).__name__}, not a tasks.recipes.Recipe or a "
                          "function of no arguments returning one")
    try:
        recipe = target()
    except BaseException as err:  # SystemExit too: a recipe factory must not end the process
        raise RecipeError(f"recipe {path!r}: building the recipe failed ({type(err).__name__}: {err})") from None
    if not isinstance(recipe, Recipe):
        raise RecipeError(f"recipe {path!r} returned a {type(recipe).__name__}, not a tasks.recipes.Recipe")
    return recipe


def _linear_data(p: RecipeParams) -> Data:
    generator = torch.Generator().manual_seed(p.seed)
    inputs = torch.randn(128, 10, generator=generator)
    labels = torch.randint(0, 2, (128,), generator=generator)
    return Data(train=TensorDataset(inputs, labels))


linear = Recipe(
    build_model=lambda p: nn.Linear(10, 2),
    build_data=_linear_data,
    default_lr=0.01,
    default_batch_size=16,
    description="Linear(10, 2) on 128 synthetic samples with labels 0/1, cross-entropy, SGD",
)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _digits_data(p: RecipeParams) -> Data:
    from sklearn.datasets import load_digits  # ships inside scikit-learn: nothing is downloaded

    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    train, held_out = order[:1440], order[1440:]  # 1440 divides evenly over 1-6 workers
    return Data(train=TensorDataset(inputs[train], labels[train]),
                validation=TensorDataset(inputs[held_out], labels[held_out]))


def _accuracy(model: nn.Module, data: Dataset) -> dict[str, float]:
    inputs, labels = data.tensors
    with torch.no_grad():
        logits = model(inputs)
    return {"val_loss": nn.functional.cross_entropy(logits, labels).item(),
            "val_accuracy": (logits.argmax(dim=1) == labels).float().mean().item()}


digits = Recipe(
    build_model=lambda p: _MLP(),
    build_data=_digits_data,
    build_optimizer=lambda params, p: torch.optim.SGD(params, lr=p.lr, momentum=0.9),
    evaluate=_accuracy,
    default_lr=0.05,
    default_batch_size=32,
    description="MLP on scikit-learn's digits (1440 train / 357 held out), SGD with momentum",
)
