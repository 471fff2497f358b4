"""Block start to first training step, fresh and resumed, through Baton's own block (`run_block`:
a `TorchTrainer` running Baton's worker loop) on a Ray cluster.

Run as `python -m bench._resume_block ADDRESS STORE REPS WIDTH`; prints JSON. A first, unmeasured
block warms the cluster up and leaves a checkpoint of 8 * WIDTH^2 bytes (weights + SGD momentum)
that every resumed block loads.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from tasks.recipes import RecipeParams
from tasks.runtime.settings import TrainSettings
from tasks.runtime.spec import BlockSpec


def _first_step_after(times_file: str, started: float) -> float:
    with open(times_file) as handle:
        steps = [e["t"] for e in map(json.loads, handle) if e["event"] == "step" and e["t"] >= started]
    if not steps:
        raise RuntimeError("the block trained no step")
    return min(steps) - started


def main(address: str, store: str, reps: int, width: int) -> None:
    import ray

    from tasks.block import bring_lineage_to_block_end as run_block
    from tasks.trainer import RAY_TRAIN_ENV

    ray.init(address=address, runtime_env={"env_vars": dict(RAY_TRAIN_ENV)}, log_to_driver=False)
    logger = logging.getLogger("bench")
    params = RecipeParams(seed=0, lr=1e-4, batch_size=16, epochs=reps + 1, options={"width": width})
    times = os.environ["BATON_BENCH_TIMES"]

    def block(lineage: str, epoch: int) -> float:
        spec = BlockSpec(index=epoch, lineage=lineage, start_epoch=epoch, end_epoch=epoch + 1, params=params,
                         settings=TrainSettings(store=store, recipe="bench.recipes:timed_big", workers=1))
        started = time.time()
        run_block(spec, logger)
        return _first_step_after(times, started)

    # Not measured: the cluster's first block (cold worker processes and imports), which also leaves
    # the checkpoint every resumed block loads.
    block("base", 0)
    fresh, resumed = [], []
    for rep in range(reps):  # alternating which goes first
        if rep % 2 == 0:
            fresh.append(block(f"fresh{rep}", 0))
        resumed.append(block("base", rep + 1))
        if rep % 2 == 1:
            fresh.append(block(f"fresh{rep}", 0))
    print(json.dumps({"fresh_s": fresh, "resumed_s": resumed}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
