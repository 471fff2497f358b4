"""loop_vs_plain: the language-model example's training speed under Baton (its own loop through the
ctx API, a checkpoint per epoch) against the same model, data and step in one plain
`TorchTrainer.fit` with a per-epoch `torch.save` checkpoint reported to Ray, on the same cluster.

Speed is optimizer steps per second of rank 0 between its first and last step, so start-up (which
`blocks_vs_one_fit` and `flow_vs_plain` measure) is left out and what remains is the per-step cost
of Baton's loop: `ctx.step`, the loader, the per-epoch commit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ._common import Result, median
from .flow import BIN, ROOT, cluster

OPTIONS = {"width": 96, "layers": 2, "heads": 4, "context": 64, "batch": 16, "accumulate": 2, "windows": 1024}
EPOCHS = 3


def timed_lm(ctx) -> None:
    """examples.lm's loop, marking each step (rank 0) for the benchmark."""
    from bench.recipes import mark
    from examples import lm

    step = ctx.step

    def marked(**metrics: float) -> None:
        step(**metrics)
        mark("step")

    ctx.step = marked
    lm.train_loop(ctx)


def plain_lm(config: dict) -> None:
    """The same training written as a plain Ray Train loop (what a user would write without Baton)."""
    import ray.train
    import ray.train.torch
    import torch
    from torch.nn import functional as F
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from bench.recipes import mark
    from examples import lm

    o = {**lm.DEFAULTS, **config["options"]}
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokens = lm.corpus()
    held_out = len(tokens) // 20
    train_set, validation = lm.Windows(tokens[held_out:], o["context"], o["windows"]), lm.Windows(tokens[:held_out], o["context"], 64)
    model = lm.TinyGPT(o["width"], o["layers"], o["heads"], o["context"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=o["lr"], weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config["epochs"])
    net = ray.train.torch.prepare_model(model)
    context = ray.train.get_context()
    sampler = DistributedSampler(train_set, num_replicas=context.get_world_size(), rank=context.get_world_rank(),
                                 seed=0, drop_last=True)
    loader = DataLoader(train_set, batch_size=o["batch"], sampler=sampler)
    amp = dict(device_type="cpu", dtype=torch.bfloat16)
    for epoch in range(config["epochs"]):
        sampler.set_epoch(epoch)
        for micro, (x, y) in enumerate(loader, start=1):
            with torch.autocast(**amp):
                loss = F.cross_entropy(net(x).flatten(0, 1).float(), y.flatten()) / o["accumulate"]
            loss.backward()
            if micro % o["accumulate"] == 0 or micro == len(loader):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                mark("step")
        scheduler.step()
        val_loss = lm.evaluate(model, validation, torch.device("cpu"), amp)
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if context.get_world_rank() == 0:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict()}, os.path.join(folder, "state.pt"))
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({"loss": loss.item(), "val_loss": val_loss, "epoch": epoch}, checkpoint=checkpoint)


def _plain_main(address: str, storage: str, epochs: int = EPOCHS, options: dict | None = None) -> None:
    """`address` "local": start a local Ray, as a plain script would."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tasks.trainer import RAY_TRAIN_ENV

    ray.init(address=None if address == "local" else address, runtime_env={"env_vars": dict(RAY_TRAIN_ENV)},
             log_to_driver=False)
    TorchTrainer(plain_lm, train_loop_config={"options": options or OPTIONS, "epochs": epochs},
                 scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                 run_config=RunConfig(name=f"plain-lm-{os.getpid()}", storage_path=storage)).fit()


def _steps_per_s(times: Path) -> tuple[float, int]:
    steps = [json.loads(line)["t"] for line in times.read_text().splitlines() if '"step"' in line]
    return (len(steps) - 1) / (max(steps) - min(steps)), len(steps)


def _run(cmd: list[str], env: dict, cwd: Path, what: str) -> None:
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{out.stderr[-3000:]}")


def loop_vs_plain(reps: int) -> Result:
    import shutil

    work = Path(tempfile.mkdtemp(prefix="bl", dir="/tmp"))
    try:
        with cluster(work) as env:
            times = Path(env["BATON_BENCH_TIMES"])
            baton, plain, steps = [], [], 0
            for run in range(reps):  # alternating, so drift on a shared machine hits both sides
                times.unlink(missing_ok=True)
                _run([sys.executable, "-m", "bench.loop", env["RAY_ADDRESS"], str(work / f"plain-{run}")], env, ROOT,
                     "plain Ray Train")
                plain.append(_steps_per_s(times)[0])
                times.unlink(missing_ok=True)
                _run([str(BIN / "baton"), "train", "--loop", "bench.loop:timed_lm", "--workers", "2",
                      "--epochs", str(EPOCHS), "--epochs-per-block", str(EPOCHS), "--store", str(work / "store"),
                      "--lineage", f"lm{run}", "--options", json.dumps(OPTIONS)], env, ROOT, "baton train")
                rate, steps = _steps_per_s(times)
                baton.append(rate)
        ratio = median(baton) / median(plain)
        return Result("loop_vs_plain", ratio, ">= 0.97", ratio >= 0.97, detail={
            "workers": 2, "epochs": EPOCHS, "steps": steps, "baton_steps_per_s": round(median(baton), 3),
            "plain_steps_per_s": round(median(plain), 3)},
            note="steps/s of rank 0, first to last step; a checkpoint per epoch on both sides")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    _plain_main(sys.argv[1], sys.argv[2], *(int(sys.argv[3]), json.loads(sys.argv[4])) if len(sys.argv) > 3 else ())
