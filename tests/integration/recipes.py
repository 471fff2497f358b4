"""A user recipe for resume drills: dropout (RNG), momentum (optimizer state), a scheduler, custom
state (an EMA of the weights and a step counter), and steps slow enough to be interrupted."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

from tasks.recipes import Data, Recipe, RecipeParams

def _data(p: RecipeParams) -> Data:
    generator = torch.Generator().manual_seed(p.seed)
    return Data(train=TensorDataset(torch.randn(128, 10, generator=generator),
                                    torch.randint(0, 2, (128,), generator=generator)))


def _model(p: RecipeParams) -> nn.Module:
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2))


def _sleeping_loss(seconds: float):
    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        time.sleep(seconds)
        return nn.functional.cross_entropy(outputs, targets)
    return loss


def _after_step(model: nn.Module) -> None:
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ema = getattr(model, "_ema", None)
    model._ema = weights.clone() if ema is None else 0.9 * ema + 0.1 * weights
    model._steps = getattr(model, "_steps", 0) + 1


def _extra_state(model: nn.Module) -> dict:
    return {"ema": model._ema, "steps": model._steps} if hasattr(model, "_ema") else {}


def _load_extra_state(model: nn.Module, state: dict) -> None:
    if state:
        model._ema, model._steps = state["ema"].clone(), int(state["steps"])


def _drill(step_seconds: float) -> Recipe:
    return Recipe(
        build_model=_model,
        build_data=_data,
        loss=_sleeping_loss(step_seconds),
        build_optimizer=lambda params, p: torch.optim.SGD(params, lr=p.lr, momentum=0.9),
        build_scheduler=lambda opt, p: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        after_step=_after_step,
        extra_state=_extra_state,
        load_extra_state=_load_extra_state,
        default_lr=0.05,
        default_batch_size=8,
    )


drill = _drill(0.05)
# Slow enough that ten kills land before training ends, although the workers of a killed driver
# keep training for 1.5-2.5 s.
slow_drill = _drill(0.3)
