"""The few collectives a block needs, the same on one process and on a DDP group (gloo or NCCL)."""

from __future__ import annotations

from typing import Any

import torch

from .errors import CommitFailed


class Collectives:
    """All ranks call each method in the same order (they are collectives)."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._group = None
        if world_size > 1:
            import torch.distributed as dist

            if dist.get_backend() == "nccl":
                # Baton's own collectives (votes, metric sums, RNG states) go over a gloo group on
                # the host: on NCCL each would need a device tensor and a stream sync per step.
                self._group = dist.new_group(backend="gloo")

    def gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def start_any(self, flag: bool) -> Any:
        """Begin agreeing whether `flag` is true on any rank, without waiting: `finish_any` of the
        result, a step later, reads the answer (the collective ran meanwhile, off the step's path)."""
        if self.world_size == 1:
            return flag
        import torch.distributed as dist

        value = torch.tensor([1 if flag else 0])
        return value, dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self._group, async_op=True)

    def finish_any(self, started: Any) -> bool:
        if isinstance(started, bool):
            return started
        value, work = started
        work.wait()
        return bool(value.item())

    def sum_dicts(self, *dicts: dict[str, float]) -> tuple[dict[str, float], ...]:
        """Each dict summed over the ranks; a key missing on a rank counts as 0 there."""
        if self.world_size == 1:
            return tuple(dict(d) for d in dicts)
        import torch.distributed as dist

        keys = [sorted(set().union(*(set(k) for k in ks))) for ks in zip(*self.gather_object([list(d) for d in dicts]))]
        flat = [d.get(k, 0.0) for d, names in zip(dicts, keys) for k in names]
        values = torch.tensor(flat, dtype=torch.float64)
        if values.numel():
            dist.all_reduce(values, group=self._group)
        values, out, at = values.cpu().tolist(), [], 0
        for names in keys:
            out.append(dict(zip(names, values[at:at + len(names)])))
            at += len(names)
        return tuple(out)

    def mean_dict(self, values: dict[str, float]) -> dict[str, float]:
        (total,) = self.sum_dicts(values)
        return {k: v / self.world_size for k, v in total.items()}

    def agree(self, error: BaseException | None) -> None:
        """Rank 0 tells every rank whether its save failed, and why; all ranks must call this, or
        the others would hang in the next collective. The others fail naming rank 0's error, so
        whichever rank's error a summary shows, it says what went wrong."""
        told = f"{type(error).__name__}: {error}" if error is not None else None
        if self.world_size > 1:
            told = self.broadcast_object(told)
        if error is not None:
            raise error
        if told is not None:
            raise CommitFailed(f"rank 0 failed to commit the checkpoint: {told}")
