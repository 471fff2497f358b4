"""Block boundaries and start-up against the plain Ray Train script a user would otherwise write.

`baton train` of the language-model loop, 8 epochs in 4 blocks, against ONE plain
`TorchTrainer.fit` of the same 8 epochs with a per-epoch checkpoint (bench.loop.plain_lm), both as
whole processes from a cold start (each starts its own local Ray; Baton also its Prefect server),
alternating. From the same runs:
- blocks_vs_one_fit: wall time, Baton / plain.
- block_boundary_s: last step of block k to first step of block k+1 (warm worker group), median.
- first_step_vs_plain: process start to first training step, Baton / plain.
- rerun_noop_s: `baton train` again on the finished lineage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._common import Result, median
from .flow import BIN, ROOT

EPOCHS, BLOCKS = 8, 4
OPTIONS = {"width": 96, "layers": 2, "heads": 4, "context": 64, "batch": 16, "accumulate": 2, "windows": 6144}


def _env(work: Path) -> dict[str, str]:
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HOME=str(home), PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", BATON_BENCH_TIMES=str(work / "times.jsonl"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for key in ("PREFECT_API_URL", "RAY_ADDRESS"):
        env.pop(key, None)
    return env


def _steps(times: Path) -> list[float]:
    return sorted(json.loads(line)["t"] for line in times.read_text().splitlines() if '"step"' in line)


def _run(cmd: list[str], env: dict, what: str) -> tuple[float, float]:
    """(wall seconds, absolute start time) of a whole process."""
    started_at, started = time.time(), time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - started, started_at


def blocks_vs_one_fit(reps: int) -> list[Result]:
    work = Path(tempfile.mkdtemp(prefix="bw", dir="/tmp"))
    env, times = _env(work), work / "times.jsonl"
    plain, baton, first_plain, first_baton, boundaries, noop = [], [], [], [], [], []
    try:
        for run in range(reps):
            times.unlink(missing_ok=True)
            wall, t0 = _run([sys.executable, "-m", "bench.loop", "local", str(work / f"plain{run}"), str(EPOCHS),
                             json.dumps(OPTIONS)], env, "plain Ray Train")
            plain.append(wall)
            first_plain.append(_steps(times)[0] - t0)
            times.unlink(missing_ok=True)
            args = [str(BIN / "baton"), "train", "--loop", "bench.loop:timed_lm", "--workers", "2", "--epochs",
                    str(EPOCHS), "--epochs-per-block", str(EPOCHS // BLOCKS), "--store", str(work / "store"),
                    "--lineage", f"lm{run}", "--options", json.dumps(OPTIONS)]
            wall, t0 = _run(args, env, "baton train")
            baton.append(wall)
            steps = _steps(times)
            first_baton.append(steps[0] - t0)
            per_block = len(steps) // BLOCKS
            boundaries += [steps[b * per_block] - steps[b * per_block - 1] for b in range(1, BLOCKS)]
            noop.append(_run(args, env, "baton train (rerun)")[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio, first = median(baton) / median(plain), median(first_baton) / median(first_plain)
    detail = {"baton_s": round(median(baton), 1), "plain_s": round(median(plain), 1), "epochs": EPOCHS,
              "blocks": BLOCKS, "workers": 2}
    return [
        Result("blocks_vs_one_fit", ratio, "<= 1.10", ratio <= 1.10, detail=detail,
               note="whole processes from a cold start: baton train in 4 blocks vs one plain TorchTrainer.fit"),
        Result("block_boundary_s", median(boundaries), "<= 1.0", median(boundaries) <= 1.0, unit="s",
               detail={"each_s": [round(b, 2) for b in boundaries]},
               note="last step of block k to first step of block k+1, warm worker group"),
        Result("first_step_vs_plain", first, "<= 1.3", first <= 1.3,
               detail={"baton_s": round(median(first_baton), 1), "plain_s": round(median(first_plain), 1)}),
        Result("rerun_noop_s", median(noop), "<= 5", median(noop) <= 5, unit="s",
               detail={"each_s": [round(n, 1) for n in noop]}, note="baton train again on the finished lineage"),
    ]
