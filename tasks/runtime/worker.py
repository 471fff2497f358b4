"""Where a block's training runs: the Ray Train worker entry, the same loop in one process
(`run_local`, for tests and single-device runs without Ray), and the built-in recipe loop.

Every rank runs the loop; rank 0 commits checkpoints (DESIGN invariant 7: exact resume).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

import torch

from .context import TrainContext
from .errors import LoopNotFound, Preempted
from .recipes import import_attribute, load_recipe
from .spec import BlockSpec

log = logging.getLogger("baton.worker")

TrainLoop = Callable[[TrainContext], Any]


def worker_loop(config: dict[str, Any]) -> None:
    """`TorchTrainer`'s train_loop_per_worker."""
    import ray.train
    import ray.train.torch

    spec = BlockSpec.model_validate(config)
    if spec.warm_group:
        from .group import join_group

        joined = join_group(spec)
        if joined is None:
            return  # a prestarted group whose first block never came: end untrained
        spec = joined
    context = ray.train.get_context()
    device = ray.train.torch.get_device() if spec.settings.gpus_per_worker else torch.device("cpu")
    ctx = TrainContext(spec, context.get_world_rank(), context.get_world_size(),
                       local_rank=context.get_local_rank(), device=device, report=ray.train.report, ray_train=True)
    try:
        run_loop(ctx)
    except Preempted:
        # A clean end for Ray Train, which would otherwise restart the group (max_failures) only
        # for it to stop again; the block task reads the committed checkpoint and reports it.
        return


def run_local(spec: BlockSpec, report: Callable[[dict[str, Any]], None] | None = None) -> TrainContext:
    """Run the block's loop in this process as the only rank (no Ray, no process group): for
    tests, and for one device without a cluster. Checkpoints go to the same store, the same way."""
    device = torch.device("cuda", 0) if spec.settings.gpus_per_worker and torch.cuda.is_available() else torch.device("cpu")
    ctx = TrainContext(spec, 0, 1, device=device, report=report)
    run_loop(ctx)
    return ctx


def run_loop(ctx: TrainContext) -> None:
    spec = ctx.spec
    # Same thread count before and after a resume: float reductions stay identical.
    torch.set_num_threads(max(1, int(spec.settings.cpus_per_worker)))
    importable(spec.import_paths)
    loop = load_loop(spec.settings.loop) if spec.settings.loop else recipe_loop
    # Model initialisation is the same on every rank and in every attempt.
    torch.manual_seed(spec.params.seed)
    try:
        loop(ctx)
        ctx.finish()
    except BaseException:
        ctx.abandon()
        raise


def importable(paths: list[str]) -> None:
    """The folder `baton train` ran in is importable, as with `python -m` (user loops, recipes)."""
    for path in reversed(paths):
        if path not in sys.path:
            sys.path.insert(0, path)


def load_loop(path: str) -> TrainLoop:
    """Import `module:attr`, a function `train_loop(ctx)`. Nothing is called to check it."""
    target = import_attribute(path, "loop", "examples.lm:train_loop", LoopNotFound)
    if not callable(target):
        raise LoopNotFound(f"loop {path!r} is a {type(target).__name__}, not a function train_loop(ctx)")
    return target


def recipe_loop(ctx: TrainContext) -> None:
    """The built-in loop: a recipe's model, data and loss, supervised, one optimizer step per batch."""
    spec, params = ctx.spec, ctx.params
    recipe = load_recipe(spec.settings.recipe)
    data = recipe.build_data(params)
    model = recipe.build_model(params)
    optimizer = recipe.build_optimizer(model.parameters(), params)
    scheduler = recipe.build_scheduler(optimizer, params) if recipe.build_scheduler else None
    extra = recipe.extra_state(model) if recipe.extra_state else {}
    extra = ctx.restore(model=model, optimizer=optimizer, scheduler=scheduler, state=extra)
    if recipe.load_extra_state is not None and extra:
        recipe.load_extra_state(model, extra)
    ddp = ctx.prepare_model(model) if ctx.world_size > 1 else model.to(ctx.device)
    loader = ctx.loader(data.train, batch_size=params.batch_size)
    for _ in ctx.epochs():
        ddp.train()
        for inputs, targets in loader:
            inputs, targets = inputs.to(ctx.device), targets.to(ctx.device)
            optimizer.zero_grad()
            loss = recipe.loss(ddp(inputs), targets)
            loss.backward()
            optimizer.step()
            if recipe.after_step is not None:
                recipe.after_step(model)
            if recipe.extra_state is not None:
                extra.update(recipe.extra_state(model))
            ctx.step(loss=loss.item())
        if scheduler is not None:
            scheduler.step()
        ctx.end_epoch(**_evaluate(recipe, model, data, ctx))


def _evaluate(recipe, model: torch.nn.Module, data, ctx: TrainContext) -> dict[str, float]:
    if recipe.evaluate is None or data.validation is None:
        return {}
    model.eval()
    try:
        return recipe.evaluate(model, data.validation)
    finally:
        model.train()
