"""notice_to_commit_s: from a preemption signal to the committed checkpoint of the step the loop
stopped at, divided by (one step + one sync save) measured in the same run. Goal <= 1.5.

In one process (`run_local`, no Ray, no server), as `baton train` gets it: `on_signals` holds the
SIGTERM handler, a timer thread sends this process SIGTERM at a random moment of a step, the handler
writes the notice, rank 0's watcher reads it, the vote stops the loop, the checkpoint is committed
(sync mode). The step and the save are timed in the same run: the mean of plain steps, and the
extra time of the steps that also committed a checkpoint (`checkpoint_every_steps`).

What the ratio holds, by design: up to one poll of the watcher (0.25 s), the rest of the step in
which the notice landed, one more step (the vote runs during it, off the step's path), the save.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import tempfile
import threading
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ._common import Result

GOAL = 1.5
EVERY = 8  # a periodic checkpoint every 8 steps: the save's cost is read off those steps
_marks: list[tuple[float, bool]] = []  # (time a ctx.step returned, did it commit?)


def loop(ctx) -> None:
    """An MLP of ~24 M parameters (~190 MB with SGD momentum) on random data: a step and a save of
    about the same size, a few tenths of a second each on this machine."""
    width, batch = int(ctx.options.get("width", 2048)), int(ctx.options.get("batch", 64))
    model = nn.Sequential(*(layer for _ in range(5) for layer in (nn.Linear(width, width), nn.ReLU())))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    ctx.restore(model=model, optimizer=optimizer)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(batch * int(ctx.options.get("batches", 400)), width, generator=generator))
    loader = ctx.loader(data, batch_size=batch)
    for _ in ctx.epochs():
        for (x,) in loader:
            optimizer.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            optimizer.step()
            before = ctx.global_step
            ctx.step(loss=loss.item())
            _marks.append((time.perf_counter(), (before + 1) % EVERY == 0))
        ctx.end_epoch()


def _step_and_save(marks: list[tuple[float, bool]]) -> tuple[float, float]:
    durations = [(b - a, saved) for (a, _), (b, saved) in zip(marks, marks[1:])]
    plain = [d for d, saved in durations[1:] if not saved]  # the first step warms up
    with_save = [d for d, saved in durations if saved]
    step = statistics.median(plain)
    return step, max(statistics.median(with_save) - step, 0.0) if with_save else 0.0


def _one(folder: str, lineage: str, rng: random.Random) -> dict[str, float]:
    from flows.config import TrainConfig
    from flows.signals import on_signals
    from tasks.errors import Preempted
    from tasks.runtime.worker import run_local

    from ckpt import CheckpointStore

    config = TrainConfig(store=folder, lineage=lineage, loop="bench.preempt:loop", epochs=1, workers=1,
                         checkpoint_every_steps=EVERY, checkpoint_mode="sync", options={"width": 2048})
    [spec] = config.blocks()
    store = CheckpointStore(folder)
    _marks.clear()
    sent: list[float] = []

    def send() -> None:
        # After three periodic saves (the step and save are known), at a random moment of a step.
        while sum(saved for _, saved in _marks) < 3:
            time.sleep(0.01)
        step, _ = _step_and_save(list(_marks))
        time.sleep(rng.uniform(0, step))
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGTERM)

    timer = threading.Thread(target=send, daemon=True)
    timer.start()
    stopped = None
    with on_signals(store, lineage, 0):
        try:
            run_local(spec)
        except Preempted as err:
            stopped = time.perf_counter()
            message = str(err)
    if stopped is None or not sent:
        raise RuntimeError(f"{lineage}: training ended before the signal stopped it; make the epoch longer")
    latest = store.latest(lineage)
    if f"step {latest.step} " not in message:
        raise RuntimeError(f"{lineage}: stopped with {message!r} but the latest checkpoint is {latest.id}")
    step, save = _step_and_save([m for m in _marks if m[0] <= sent[0]])
    notice = stopped - sent[0]
    return {"notice_to_commit_s": notice, "step_s": step, "save_s": save, "ratio": notice / (step + save)}


def notice_to_commit(reps: int = 3) -> Result:
    rng = random.Random(20261128)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-preempt-") as folder:
        for rep in range(reps):
            runs.append(_one(folder, f"notice{rep}", rng))
    value = statistics.median(r["ratio"] for r in runs)
    pick = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return Result(
        name="notice_to_commit_s", value=value, goal=f"<= {GOAL}", passed=value <= GOAL,
        detail={"notice_to_commit_s": f"{pick('notice_to_commit_s'):.3f}", "step_s": f"{pick('step_s'):.3f}",
                "save_s": f"{pick('save_s'):.3f}", "reps": reps,
                "ratios": ", ".join(f"{r['ratio']:.2f}" for r in runs)},
        note="SIGTERM at a random moment of a step -> committed checkpoint of the step it stopped at, over one "
             "step plus one sync save (in one process, local store)")
