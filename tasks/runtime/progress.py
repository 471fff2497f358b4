"""Where one rank stands, in three small objects a TrainContext holds: the block it trains
(`BlockCursor`), the epoch's metric sums (`EpochMeans`) and the report lines waiting for their
checkpoint's commit (`Reports`)."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .collectives import Collectives
from .errors import NonFiniteMetric
from .group import BlockCommand
from .spec import BlockSpec


class BlockCursor:
    """The block a rank trains now. A warm group's workers go on from one block to the next
    without a restart: `advance` moves the cursor, and whoever needs the block (the committer, the
    stop vote) is handed `cursor.block` when it needs it, so nothing keeps a block that is over."""

    def __init__(self, block: BlockSpec):
        self._block = block

    @property
    def block(self) -> BlockSpec:
        return self._block

    def advance(self, command: BlockCommand) -> BlockSpec:
        """The next block, as the group's command describes it (a new spec; the old one is unchanged)."""
        self._block = command.applied_to(self._block)
        return self._block


class EpochMeans:
    """The sums and counts of the step metrics of the epoch in progress. After a reduction over the
    ranks rank 0 carries the totals on (the others start from zero), so the next reduction adds
    only what came since; the totals travel in a mid-epoch checkpoint (`progress`)."""

    def __init__(self, rank: int):
        self.rank = rank
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, metrics: dict[str, Any], *, epoch: int | None, step: int) -> None:
        """Add one step's metrics; a NaN or infinity stops the block before anything of it is committed."""
        for name, value in metrics.items():
            value = float(value.detach().float().item() if isinstance(value, torch.Tensor) else value)
            if not math.isfinite(value):
                # Nothing from this step on is committed: the last checkpoint stays the newest.
                raise NonFiniteMetric(
                    f"{name} is {value} at epoch {epoch} step {step} on rank {self.rank}: training diverged, so "
                    f"no checkpoint is committed from this step on (the newest is the last good one). Lower the "
                    f"learning rate (--lr) or check the data, then run again")
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0.0) + 1

    def reduce(self, dist: Collectives, epoch_metrics: dict[str, float] | None = None
               ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """A collective: the means over all ranks (plus `epoch_metrics` averaged over the ranks) and
        the `progress` a checkpoint saves."""
        sums, counts = dist.sum_dicts(self.sums, self.counts)
        metrics = {k: sums[k] / max(counts[k], 1.0) for k in sums}
        if epoch_metrics:
            metrics.update(dist.mean_dict({k: float(v) for k, v in epoch_metrics.items()}))
        self.sums = sums if self.rank == 0 else {}
        self.counts = counts if self.rank == 0 else {k: 0.0 for k in counts}
        return metrics, {"sums": sums, "counts": counts}

    def reset(self) -> None:
        self.sums, self.counts = {}, {}

    def resume(self, progress: dict[str, Any]) -> None:
        """A mid-epoch resume goes on with the epoch's means: rank 0 takes the saved totals."""
        if "sums" not in progress:
            return
        if self.rank == 0:
            self.sums, self.counts = dict(progress["sums"]), dict(progress["counts"])
        else:
            self.sums, self.counts = {}, {k: 0.0 for k in progress["counts"]}


class Reports:
    """The lines `ray.train.report` gets (a barrier every rank calls with the same reduced line).
    With background saves a line waits until its checkpoint is known to be committed: the next
    commit, or `flush` at the block's end."""

    def __init__(self, send: Callable[[dict[str, Any]], None], hold_until_committed: bool):
        self._send, self._hold = send, hold_until_committed
        self._pending: dict[str, Any] | None = None

    def committed(self, line: dict[str, Any] | None) -> None:
        """A checkpoint was committed (or, in async mode, its save started) with this line (None: no report)."""
        if not self._hold:
            self._deliver(line)
            return
        # Only now is the previous save known to be committed: report it, hold this one back.
        self._deliver(self._pending)
        self._pending = line

    def flush(self) -> None:
        """Every save is committed: send what was held back."""
        self._deliver(self._pending)
        self._pending = None

    def _deliver(self, line: dict[str, Any] | None) -> None:
        if line is not None:
            self._send(line)
