"""A distributed sampler that resumes mid-epoch at the saved batch.

The permutation of epoch `e` depends only on (seed, e), so it is the same after a restart; each rank
takes every `world_size`-th index of it. To keep every rank at the same number of steps (DDP
needs that) without showing any sample twice, the last `len % world_size` indices of each epoch's
permutation are left out of that epoch (a different few each epoch); make the data set a multiple of
the world size to train on every sample every epoch.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .errors import InvalidArgument


class ResumableSampler(torch.utils.data.Sampler[list[int]]):
    """Yields batches of indices for one rank, starting at `start_batch` of the current epoch."""

    def __init__(self, length: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise InvalidArgument(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1:
            raise InvalidArgument(f"batch_size must be >= 1, got {batch_size}")
        if length < world_size:
            raise InvalidArgument(f"the data set has {length} samples, fewer than the {world_size} workers")
        self.length, self.batch_size = length, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        if epoch < 0 or not 0 <= start_batch <= self.batches_per_epoch():
            raise InvalidArgument(f"position (epoch {epoch}, batch {start_batch}) is outside an epoch of "
                             f"{self.batches_per_epoch()} batches; was the checkpoint written with another "
                             "data set size, batch size or world size?")
        self.epoch, self.start_batch = epoch, start_batch

    def shard(self, epoch: int) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        usable = self.length - self.length % self.world_size
        return order[self.rank:usable:self.world_size]

    def batches_per_epoch(self) -> int:
        per_rank = self.length // self.world_size
        return -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        shard = self.shard(self.epoch)
        for batch in range(self.start_batch, self.batches_per_epoch()):
            yield shard[batch * self.batch_size:(batch + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start_batch
