"""`ctx.loader`: torchdata's StatefulDataLoader over this rank's shard, with its position saved.

Why torchdata: its `StatefulDataLoader` is PyTorch's own drop-in `DataLoader` with
`state_dict()`/`load_state_dict()` that also covers worker processes (num_workers > 0) and
prefetching; the sharding is its `StatefulDistributedSampler` (DistributedSampler semantics).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Iterator

import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from .errors import LoopError

_ATTEMPT = os.urandom(4).hex()  # one per worker process: tells a retried batch from the first try


class BatonLoader(StatefulDataLoader):
    """A StatefulDataLoader that knows its epoch and how many batches of it were yielded."""

    def __init__(self, dataset: Any, batch_size: int, sampler: StatefulDistributedSampler, seed: int, **kwargs: Any):
        super().__init__(dataset, batch_size=batch_size, sampler=sampler,
                         generator=torch.Generator().manual_seed(seed), **kwargs)
        self._seed, self._shard_sampler = seed, sampler
        self.epoch, self.batches_done = 0, 0
        self._audited = 0
        self._order: list[int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self._shard_sampler.set_epoch(epoch)
        # Worker seeds come from this generator, never from the global RNG of the training step.
        self.generator.manual_seed(self._seed * 1_000_003 + epoch)
        self.epoch, self.batches_done = epoch, 0

    def __iter__(self):
        for batch in super().__iter__():
            self.batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "torchdata": super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("epoch") != self.epoch:
            raise ValueError(f"loader position of epoch {state.get('epoch')} loaded into epoch {self.epoch}")
        super().load_state_dict(state["torchdata"])
        self.batches_done = int(state["batches_done"])

    # ---- the sample audit log (`sample_log`): which samples each rank trained on
    def audit_from(self, batch: int) -> None:
        self._audited, self._order = batch, None

    def write_audit(self, folder: str, rank: int) -> None:
        if self._audited >= self.batches_done:
            return
        if self._order is None:
            self._order = self._epoch_order()
        os.makedirs(folder, exist_ok=True)
        size = self.batch_size
        with open(os.path.join(folder, f"rank{rank}.jsonl"), "a") as handle:
            for batch in range(self._audited, self.batches_done):
                indices = self._order[batch * size:(batch + 1) * size]
                handle.write(json.dumps({"attempt": _ATTEMPT, "epoch": self.epoch, "batch": batch, "rank": rank,
                                         "indices": indices}) + "\n")
        self._audited = self.batches_done

    def _epoch_order(self) -> list[int]:
        s = self._shard_sampler
        copy = StatefulDistributedSampler(self.dataset, num_replicas=s.num_replicas, rank=s.rank, shuffle=s.shuffle,
                                          seed=s.seed, drop_last=True)
        copy.set_epoch(self.epoch)
        return [int(i) for i in copy]


def make_loader(dataset: Any, batch_size: int, *, rank: int, world_size: int, seed: int, shuffle: bool,
                **kwargs: Any) -> BatonLoader:
    if len(dataset) < world_size:
        raise ValueError(f"the data set has {len(dataset)} samples, fewer than the {world_size} workers")
    # drop_last=True: every rank gets the same number of samples (DDP needs equal steps) and no
    # sample is repeated; the len % world_size left out differ from epoch to epoch.
    sampler = StatefulDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                         drop_last=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*set_vital.*")  # torchdata's own deprecation noise
        return BatonLoader(dataset, batch_size, sampler, seed, **kwargs)


class RankLoaders:
    """The ctx.loaders of one rank, in the order the loop made them: their positions go into every
    checkpoint, and they say where in the epoch the rank is (with accumulation, several batches a step)."""

    def __init__(self, rank: int, world_size: int, seed: int):
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.loaders: list[BatonLoader] = []
        self.window_open = False  # `accumulate` yielded a micro-batch of a window not yet ended

    def make(self, dataset: Any, batch_size: int, *, shuffle: bool, **kwargs: Any) -> BatonLoader:
        if "sampler" in kwargs or "batch_sampler" in kwargs:
            raise LoopError("ctx.loader shards the data over the ranks itself: pass no sampler/batch_sampler "
                            "(use shuffle=False for a fixed order)")
        loader = make_loader(dataset, batch_size, rank=self.rank, world_size=self.world_size, seed=self.seed,
                             shuffle=shuffle, **kwargs)
        self.loaders.append(loader)
        return loader

    def __len__(self) -> int:
        return len(self.loaders)

    def begin_epoch(self, epoch: int, saved: list[Any] | None) -> None:
        """Every loader at the start of `epoch`, or at its `saved` positions (a mid-epoch resume)."""
        for i, loader in enumerate(self.loaders):
            loader.set_epoch(epoch)
            if saved is not None:
                loader.load_state_dict(saved[i])
            loader.audit_from(loader.batches_done if saved is not None else 0)

    def state_dicts(self) -> list[dict[str, Any]]:
        return [loader.state_dict() for loader in self.loaders]

    def batches_done(self) -> int:
        """Batches of the epoch trained: mid-epoch only the loader being trained on has moved."""
        return max(loader.batches_done for loader in self.loaders)

    def mid_epoch(self) -> bool:
        """Every loader is inside its epoch: at a loader's last batch the epoch-end commit follows
        (the same step would otherwise be committed twice)."""
        return bool(self.loaders) and all(loader.batches_done < len(loader) for loader in self.loaders)

    def first(self, call: str) -> BatonLoader:
        if not self.loaders:
            raise LoopError(f"{call} counts the batches of a ctx.loader: make one with ctx.loader(...) first")
        return self.loaders[0]

    def accumulate(self, loader: BatonLoader, every: int) -> Iterator[tuple[Any, bool]]:
        """`(batch, step)` for each batch of `loader`; `step`: the batch ends a window of `every`
        counted from the epoch's start (the loader's own count, right after a resume) or the epoch."""
        if not any(loader is mine for mine in self.loaders):
            raise LoopError("ctx.accumulate(loader, ...) takes a loader made by ctx.loader: only its position "
                            "is known after a resume")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise LoopError(f"ctx.accumulate(..., every={every!r}): every is a number of micro-batches, 1 or more")
        return self._windows(loader, every)

    def _windows(self, loader: BatonLoader, every: int) -> Iterator[tuple[Any, bool]]:
        try:
            for batch in loader:
                done = loader.batches_done
                step = done % every == 0 or done == len(loader)
                self.window_open = not step
                yield batch, step
        finally:
            self.window_open = False

    def audit(self, folder: str | None) -> None:
        if folder:
            for loader in self.loaders:
                loader.write_audit(folder, self.rank)
