"""resume_vs_fresh: time from block start to the first training step, resumed vs fresh.

The figure is measured on real blocks (`bench._resume_block`: Baton's `run_block`, a `TorchTrainer`
running Baton's worker loop on a Ray cluster started for the benchmark), fresh blocks alternating with
blocks that resume a 256 MiB checkpoint. The detail also shows the part of it that differs, measured
in-process on Baton's worker code (`tasks.runtime.worker`, world size 1): from entering the worker
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

from ckpt import CheckpointStore
from tasks.runtime.context import TrainContext
from tasks.recipes import RecipeParams, load_recipe
from tasks.runtime.settings import TrainSettings
from tasks.runtime.spec import BlockSpec
from tasks.runtime.worker import run_local

from ._common import MiB, Result, median

WIDTH = {"full": 5792, "quick": 5792}  # 5792^2 float32 weights + momentum: 256 MiB of state


def _to_first_forward(spec: BlockSpec) -> float:
    """Worker loop entry (the ctx built) to the first forward pass: restore, loader, first batch."""
    started = time.perf_counter()
    ctx = TrainContext(spec, 0, 1)
    recipe = load_recipe(spec.settings.recipe)
    data = recipe.build_data(spec.params)
    model = recipe.build_model(spec.params)
    ctx.restore(model=model, optimizer=recipe.build_optimizer(model.parameters(), spec.params))
    loader = ctx.loader(data.train, batch_size=spec.params.batch_size)
    for _ in ctx.epochs():
        inputs, _ = next(iter(loader))
        with torch.no_grad():
            model(inputs)
        break
    return time.perf_counter() - started


def worker_level(reps: int, width: int = 5792, where: str | None = None) -> dict[str, float]:
    """Worker loop entry to first forward pass, fresh and resumed (seconds, medians), in-process."""
    root = tempfile.mkdtemp(prefix="baton-bench-resume-", dir=where)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the worker loop
    try:
        params = RecipeParams(seed=0, lr=1e-4, batch_size=16, epochs=2, options={"width": width})
        settings = TrainSettings(store=root, recipe="bench.recipes:big", workers=1)

        def spec(lineage: str, start: int = 0) -> BlockSpec:
            return BlockSpec(index=start, lineage=lineage, start_epoch=start, end_epoch=start + 1, params=params,
                             settings=settings)

        run_local(spec("resumed"))  # one epoch, committed: what the resumed blocks load
        manifest = CheckpointStore(root).latest("resumed")
        size = sum(e.size for e in manifest.files.values())
        fresh, resumed = [], []
        for rep in range(reps):
            fresh.append(_to_first_forward(spec(f"fresh{rep}")))
            resumed.append(_to_first_forward(spec("resumed", 1)))
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
