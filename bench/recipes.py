"""Recipes for benchmarks: a model whose checkpoint is a given size, and timestamps of the loop."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

from tasks.recipes import Data, Recipe, RecipeParams, linear


def _big_model(p: RecipeParams) -> nn.Module:
    # options.width x options.width float32 weights; with SGD momentum the state is twice that.
    width = int(p.options.get("width", 5792))
    return nn.Linear(width, width, bias=False)


def _big_data(p: RecipeParams) -> Data:
    width = int(p.options.get("width", 5792))
    generator = torch.Generator().manual_seed(p.seed)
    return Data(train=TensorDataset(torch.randn(64, width, generator=generator),
                                    torch.randn(64, width, generator=generator)))


big = Recipe(
    build_model=_big_model,
    build_data=_big_data,
    loss=nn.functional.mse_loss,
    build_optimizer=lambda params, p: torch.optim.SGD(params, lr=p.lr, momentum=0.9),
    default_lr=1e-4,
    default_batch_size=16,
    description="Linear(width, width) without bias and SGD momentum: a checkpoint of 8 * width^2 bytes",
)


# ---- timestamps of the worker loop, for block-boundary measurements --------------------------
TIMES_FILE = os.environ.get("BATON_BENCH_TIMES", "/tmp/baton-bench-times.jsonl")


def mark(event: str) -> None:
    """Append (event, wall time) for rank 0 of a Ray Train worker group."""
    try:
        import ray.train

        if ray.train.get_context().get_world_rank() != 0:
            return
    except Exception:
        pass
    with open(TIMES_FILE, "a") as handle:
        handle.write(json.dumps({"event": event, "t": time.time(), "pid": os.getpid()}) + "\n")


def _timed(recipe: Recipe, name: str) -> Recipe:
    """`recipe`, logging when the worker loop starts (building data) and each training step."""

    def build_data(p: RecipeParams) -> Data:
        mark("enter")
        return recipe.build_data(p)

    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        mark("step")
        return recipe.loss(outputs, targets)

    return dataclasses.replace(recipe, build_data=build_data, loss=loss,
                               description=f"{name}, logging when the worker loop starts and each step")


timed_linear = _timed(linear, "tasks.recipes:linear")
timed_big = _timed(big, "bench.recipes:big")
