"""Shared helpers: a synthetic training state of a given size, timing, cache dropping."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt import Position, TrainingState, capture_rng

MiB = 2**20
CHUNK = 64 * MiB


@dataclass
class Result:
    name: str
    value: float
    goal: str
    passed: bool | None
    unit: str = "ratio"
    detail: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def make_state(nbytes: int, step: int = 1) -> TrainingState:
    """Half model weights, half SGD momentum, in 64 MiB float32 tensors."""
    half = nbytes // 2
    sizes = [CHUNK // 4] * (half // CHUNK) + ([half % CHUNK // 4] if half % CHUNK else [])
    generator = torch.Generator().manual_seed(step)
    model = {f"layer{i}.weight": torch.rand(n, generator=generator) for i, n in enumerate(sizes)}
    momentum = {i: {"momentum_buffer": torch.rand(n, generator=generator)} for i, n in enumerate(sizes)}
    optimizer = {"state": momentum, "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": list(range(len(sizes)))}]}
    return TrainingState(model=model, optimizer=optimizer, rng=[capture_rng()],
                         position=Position(epoch=0, batch_in_epoch=step, epoch_complete=False, step=step))


def fsync_write(path: str, views: list[memoryview]) -> None:
    """Raw sequential write of `views` to one file, then fsync: the disk's own speed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for view in views:
            view = view.cast("B")
            for start in range(0, len(view), CHUNK):
                os.write(fd, view[start : start + CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_read(paths: list[str]) -> int:
    """Raw sequential read of whole files into memory (what `read()` of the file costs)."""
    total = 0
    for path in paths:
        with open(path, "rb") as handle:
            total += len(handle.read())
    return total


def drop_caches() -> bool:
    """Drop the page cache (root only). True when the next read is cold."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


def timed(fn, *args, **kwargs) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - started, value


def median(values: list[float]) -> float:
    return statistics.median(values)


def gb_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")
