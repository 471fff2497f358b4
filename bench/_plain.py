"""Plain Ray Train: K `TorchTrainer.fit` calls of one epoch each, the same workers and recipe as
Baton's flow, with a per-epoch checkpoint through Ray's own `ray.train.report(checkpoint=...)`.

Run as `python -m bench._plain ADDRESS STORAGE BLOCKS`; prints the wall time as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid

import torch


def loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from bench.recipes import mark, timed_linear
    from tasks.recipes import RecipeParams

    mark("enter")
    torch.set_num_threads(1)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    params = RecipeParams(seed=0, lr=0.01, batch_size=16, epochs=config["end"])
    data = timed_linear.build_data(params)
    torch.manual_seed(0)
    model = timed_linear.build_model(params)
    optimizer = torch.optim.SGD(model.parameters(), lr=params.lr)
    if config["resume"]:
        state = torch.load(os.path.join(config["resume"], "state.pt"), weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    ddp = ray.train.torch.prepare_model(model) if world > 1 else model
    sampler = DistributedSampler(data.train, num_replicas=world, rank=rank, seed=0)
    for epoch in range(config["start"], config["end"]):
        sampler.set_epoch(epoch)
        for inputs, targets in DataLoader(data.train, batch_size=16, sampler=sampler):
            optimizer.zero_grad()
            loss = timed_linear.loss(ddp(inputs), targets)
            loss.backward()
            optimizer.step()
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                           os.path.join(folder, "state.pt"))
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({"loss": loss.item(), "epoch": epoch}, checkpoint=checkpoint)


def main(address: str, storage: str, blocks: int) -> None:
    started = time.perf_counter()
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tasks.trainer import RAY_TRAIN_ENV

    ray.init(address=address, runtime_env={"env_vars": dict(RAY_TRAIN_ENV)}, log_to_driver=False)
    resume, fits = None, []
    for block in range(blocks):
        fit_started = time.time()
        trainer = TorchTrainer(loop, train_loop_config={"start": block, "end": block + 1, "resume": resume},
                               scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                               run_config=RunConfig(name=f"plain-{block}-{uuid.uuid4().hex[:6]}", storage_path=storage))
        result = trainer.fit()
        resume = result.checkpoint.path
        fits.append({"start": fit_started, "end": time.time()})
    print(json.dumps({"wall_s": time.perf_counter() - started, "fits": fits}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
