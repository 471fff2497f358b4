"""resume_vs_fresh: from entering the worker loop to the first forward pass, resumed vs fresh.

Measured in-process on Baton's own worker code (`tasks.worker._build`, world size 1): what differs
between a fresh and a resumed block is all there (listing, reading, verifying and decoding the
checkpoint, loading it into model and optimizer); Ray's worker start and process group are the same
for both and come on top (see flow_vs_plain), so the block-level ratio is closer to 1.
"""

from __future__ import annotations

import shutil
import tempfile
import time

import torch

from ckpt import Position, capture_rng
from tasks import worker
from tasks.recipes import RecipeParams
from tasks.spec import BlockSpec

from ._common import MiB, Result, median

WIDTH = {"full": 5792, "quick": 5792}  # 5792^2 float32 weights + momentum: 256 MiB of state


def _to_first_forward(spec: BlockSpec) -> float:
    started = time.perf_counter()
    run = worker._build(spec, 0, 1)
    epoch, batch = worker._start_point(run.position)
    run.sampler.set_position(epoch, batch)
    inputs, _ = worker._batch(run.data.train, next(iter(run.sampler)))
    with torch.no_grad():
        run.ddp(inputs)
    return time.perf_counter() - started


def resume_vs_fresh(reps: int, width: int = 5792, where: str | None = None,
                    ray_start_s: float | None = None) -> Result:
    root = tempfile.mkdtemp(prefix="baton-bench-resume-", dir=where)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the worker loop
    try:
        params = RecipeParams(seed=0, lr=1e-4, batch_size=16, epochs=2, options={"width": width})

        def spec(lineage: str) -> BlockSpec:
            return BlockSpec(index=0, lineage=lineage, start_epoch=0, end_epoch=2, store=root,
                             recipe="bench.recipes:big", params=params, workers=1)

        run = worker._build(spec("resumed"), 0, 1)
        inputs, targets = worker._batch(run.data.train, list(range(16)))
        run.recipe.loss(run.ddp(inputs), targets).backward()
        run.optimizer.step()
        run.position = Position(epoch=0, batch_in_epoch=1, epoch_complete=False, step=1)
        manifest = worker._commit(run, [capture_rng()], {"loss": 0.0})
        size = sum(e.size for e in manifest.files.values())
        del run
        fresh, resumed = [], []
        for rep in range(reps):
            fresh.append(_to_first_forward(spec(f"fresh{rep}")))
            resumed.append(_to_first_forward(spec("resumed")))
        ratio = median(resumed) / median(fresh)
        detail = {"state_MiB": size // MiB, "fresh_s": round(median(fresh), 3), "resumed_s": round(median(resumed), 3)}
        if ray_start_s is not None:
            block = (ray_start_s + median(resumed)) / (ray_start_s + median(fresh))
            detail.update(ray_start_s=round(ray_start_s, 2), block_level_ratio=round(block, 3))
        return Result("resume_vs_fresh", ratio, "<= 1.2", ratio <= 1.2, detail=detail,
                      note="worker loop entry to first forward pass (warm page cache); block level in detail")
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(root, ignore_errors=True)
