"""The few collectives a block needs, the same on one process and on a DDP group (gloo or NCCL)."""

from __future__ import annotations

from typing import Any

import torch


class Collectives:
    """All ranks call each method in the same order (they are collectives)."""

    def __init__(self, world_size: int, device: torch.device):
        self.world_size = world_size
        self._device = device

    @property
    def _on(self) -> torch.device:
        import torch.distributed as dist

        # NCCL reduces only device tensors; gloo only host ones.
        return self._device if dist.get_backend() == "nccl" else torch.device("cpu")

    def gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank."""
        if self.world_size == 1:
            return flag
        import torch.distributed as dist

        value = torch.tensor([1 if flag else 0], device=self._on)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def sum_dicts(self, *dicts: dict[str, float]) -> tuple[dict[str, float], ...]:
        """Each dict summed over the ranks; a key missing on a rank counts as 0 there."""
        if self.world_size == 1:
            return tuple(dict(d) for d in dicts)
        import torch.distributed as dist

        keys = [sorted(set().union(*(set(k) for k in ks))) for ks in zip(*self.gather_object([list(d) for d in dicts]))]
        flat = [d.get(k, 0.0) for d, names in zip(dicts, keys) for k in names]
        values = torch.tensor(flat, dtype=torch.float64, device=self._on)
        if values.numel():
            dist.all_reduce(values)
        values, out, at = values.cpu().tolist(), [], 0
        for names in keys:
            out.append(dict(zip(names, values[at:at + len(names)])))
            at += len(names)
        return tuple(out)

    def mean_dict(self, values: dict[str, float]) -> dict[str, float]:
        (total,) = self.sum_dicts(values)
        return {k: v / self.world_size for k, v in total.items()}

    def agree(self, error: BaseException | None) -> None:
        """Rank 0 tells every rank whether its save failed; all ranks must call this, or the others
        would hang in the next collective."""
        failed = bool(error)
        if self.world_size > 1:
            import torch.distributed as dist

            flag = torch.tensor([1 if error else 0], device=self._on)
            dist.broadcast(flag, src=0)
            failed = bool(flag.item())
        if error is not None:
            raise error
        if failed:
            raise RuntimeError("rank 0 failed to commit the checkpoint; see its log")
