"""resume_vs_fresh: time from block start to the first training step, resumed vs fresh.

The figure is measured on real blocks (`bench._resume_block`: Baton's `run_block`, a `TorchTrainer`
running Baton's worker loop on a Ray cluster started for the benchmark), fresh blocks alternating with
blocks that resume a 256 MiB checkpoint. The detail also shows the part of it that differs, measured
in-process on Baton's worker code (`tasks.worker._build`, world size 1): from entering the worker
loop to the first forward pass, which for a resume includes listing, reading, verifying and decoding
the checkpoint and loading it into model and optimizer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def worker_level(reps: int, width: int = 5792, where: str | None = None) -> dict[str, float]:
    """Worker loop entry to first forward pass, fresh and resumed (seconds, medians), in-process."""
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
        return {"state_MiB": size // MiB, "fresh_s": round(median(fresh), 3), "resumed_s": round(median(resumed), 3)}
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(root, ignore_errors=True)


def resume_vs_fresh(reps: int, width: int = 5792, where: str | None = None) -> Result:
    from .flow import cluster

    work = Path(tempfile.mkdtemp(prefix="br", dir="/tmp"))
    try:
        with cluster(work) as env:
            out = subprocess.run([sys.executable, "-m", "bench._resume_block", env["RAY_ADDRESS"],
                                  str(work / "store"), str(reps), str(width)],
                                 env=env, capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise RuntimeError(f"bench._resume_block failed:\n{out.stderr[-3000:]}")
        blocks = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fresh, resumed = median(blocks["fresh_s"]), median(blocks["resumed_s"])
    ratio = resumed / fresh
    inner = worker_level(reps, width, where)
    detail = {"state_MiB": inner["state_MiB"], "fresh_block_s": round(fresh, 2), "resumed_block_s": round(resumed, 2),
              "blocks": reps, "worker_entry_to_first_forward": {
                  "fresh_s": inner["fresh_s"], "resumed_s": inner["resumed_s"],
                  "extra_s_for_resume": round(inner["resumed_s"] - inner["fresh_s"], 3)}}
    return Result("resume_vs_fresh", ratio, "<= 1.2", ratio <= 1.2, detail=detail,
                  note="block start (run_block: TorchTrainer with Baton's worker loop) to first training step")
