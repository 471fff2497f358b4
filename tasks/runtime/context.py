"""The worker-side API of a user's training loop: `def train_loop(ctx): ...`.

A loop is written like a Ray Train `train_loop_per_worker`, with five calls to Baton:

    def train_loop(ctx):
        model, optimizer = Net(), torch.optim.AdamW(...)
        ctx.restore(model=model, optimizer=optimizer)            # load the block's start checkpoint
        model = ray.train.torch.prepare_model(model)             # DDP, device placement (as in Ray Train)
        loader = ctx.loader(dataset, batch_size=32, num_workers=2)
        for epoch in ctx.epochs():                               # from the resume point
            for x, y in loader:                                  # from the next unseen batch
                ...; optimizer.step()
                ctx.step(loss=loss.item())                       # counts; commits every N steps
            ctx.end_epoch(val_loss=...)                          # commits the epoch

Every rank runs the loop; rank 0 writes checkpoints. The RNG states of every rank, each rank's
data-loader position and the metric sums travel in the checkpoint without user code.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Iterator

import torch

from ckpt import CheckpointStore, Position, TrainingState, capture_rng

from . import faults
from ._stop_vote import PreemptionMixin, _drain_watch
from .collectives import Collectives
from .commit import Committer
from .errors import LoopError, NonFiniteMetric
from .recipes import RecipeParams
from .resume import ResumeMixin
from .spec import BlockSpec

__all__ = ["TrainContext"]

log = logging.getLogger("baton.worker")


class TrainContext(ResumeMixin, PreemptionMixin):
    """What one rank of a block sees. Built by Baton; a loop only calls its methods.

    What goes into and comes back from a checkpoint is `ResumeMixin` (tasks/_resume.py); stopping
    on a preemption notice is `PreemptionMixin` (tasks/_preemption.py)."""

    def __init__(self, spec: BlockSpec, rank: int, world_size: int, *, local_rank: int = 0,
                 device: torch.device | None = None, report: Callable[[dict[str, Any]], None] | None = None,
                 ray_train: bool = False):
        self.spec, self.rank, self.world_size, self.local_rank = spec, rank, world_size, local_rank
        self.device = device or torch.device("cpu")
        self.store = CheckpointStore(spec.settings.store, spec.settings.storage_options)
        self._report = report or (lambda metrics: None)
        self._dist = Collectives(world_size)
        self._ray_train = ray_train
        self._pending_report: dict[str, Any] | None = None  # async: sent once its checkpoint is committed
        self._objects: dict[str, Any] = {}
        self._user_state: dict[str, Any] = {}
        self._loaders: list[Any] = []
        self._restored: TrainingState | None = None
        self._position = Position(epoch=0, batch_in_epoch=0, epoch_complete=False, step=0)
        self._sums: dict[str, float] = {}
        self._counts: dict[str, float] = {}
        self._epoch: int | None = None
        self._epoch_ended = True
        self._uses_dataset_shards = False
        self._committer = Committer(spec, self.store, rank) if rank == 0 else None
        self._exhausted = False
        self.ready_s: float | None = None
        self._created = time.perf_counter()
        self._notice = None  # rank 0's preemption watcher, from the first epoch on
        self._drain = None  # every rank under Ray: is its own node draining?
        self._stop_after_epoch = False
        self._last_step_at: float | None = None
        self._step_s = 0.0
        self._committed_step = -1
        self._notice_vote: Any = None  # the preemption vote in flight (tasks._dist.start_any)

    # ---- what a loop reads
    @property
    def params(self) -> RecipeParams:
        """seed, lr, batch_size, epochs and the free-form `options` of the run's config."""
        return self.spec.params

    @property
    def options(self) -> dict[str, Any]:
        return self.spec.params.options

    @property
    def epoch(self) -> int | None:
        """The epoch in progress (None before `epochs()` starts)."""
        return self._epoch

    @property
    def global_step(self) -> int:
        return self._position.step

    @property
    def step_in_epoch(self) -> int:
        return self._position.batch_in_epoch

    # ---- the five calls
    def restore(self, model: torch.nn.Module | None = None, optimizer: Any = None, scheduler: Any = None,
                scaler: Any = None, *, state: dict[str, Any] | None = None, **stateful: Any) -> dict[str, Any]:
        """Register the stateful objects of the loop and load them from the checkpoint this block
        starts from (the lineage's newest good checkpoint, else the warm start, else nothing).

        `state`: a dict of JSON values (and tensors) that is saved with every checkpoint; returned,
        filled from the checkpoint, so the loop can keep updating it. Any other keyword is an object
        with `state_dict()`/`load_state_dict()` (a second optimizer, an EMA model...)."""
        if model is None:
            raise LoopError("ctx.restore needs model=...: the model's weights are what a checkpoint holds first")
        if self._epoch is not None:
            raise LoopError("call ctx.restore(...) before ctx.epochs(): a block resumes before it trains")
        self._objects = {"model": _unwrap(model), "optimizer": optimizer, "scheduler": scheduler,
                         "scaler": scaler, **stateful}
        self._objects = {k: v for k, v in self._objects.items() if v is not None}
        for name, obj in self._objects.items():
            if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise LoopError(f"ctx.restore({name}=...) got a {type(obj).__name__}, which has no "
                                "state_dict()/load_state_dict(); pass JSON values in state={...} instead")
        if self.device.type != "cpu":
            # Before loading: optimizer state lands on the device of the parameters it belongs to.
            self._objects["model"].to(self.device)
        self._user_state = dict(state or {})
        restored = self._load()
        if restored is not None:
            self._apply(restored)
        return self._user_state

    def epochs(self) -> Iterator[int]:
        """The epochs this block trains, from the resume point; commits each epoch that the loop
        did not end itself with `end_epoch`. In a warm worker group it goes on with the next block
        of the flow run when there is one, so the loop never learns where one block ends."""
        if not self._objects:
            raise LoopError("call ctx.restore(model=..., optimizer=...) before ctx.epochs()")
        self._restore_rng()
        if self.rank == 0:
            from .stop import NoticeWatcher

            self._notice = NoticeWatcher(self.store, self.spec.lineage, self.spec.fence)
            self.ready_s = time.perf_counter() - self._created
            log.info("block %d ready to train in %.2f s", self.spec.index, self.ready_s)
        if self._ray_train and self._drain is None:
            self._drain = _drain_watch(self)
        while True:
            epoch, start_batch = _start_point(self._position)
            resume = start_batch > 0
            while epoch < self.spec.end_epoch:
                self._begin_epoch(epoch, resume=resume)
                resume = False
                faults.at_batch(self.spec.settings.fail, self.store, self.spec.lineage, self.rank, epoch,
                                self._position.batch_in_epoch)
                yield epoch
                if not self._epoch_ended:
                    self.end_epoch()
                epoch += 1
            if not self._next_block():
                break
        self._exhausted = True

    def _next_block(self) -> bool:
        """Warm group: report the block's end (its last checkpoint committed) and wait for the next."""
        if not self.spec.warm_group:
            return False
        self._settle()
        command = None
        if self.rank == 0:
            from .group import fetch_command

            last = self._committer.parent if self._committer else None
            command = fetch_command(self.spec.warm_group, self._position.epochs_done, last)
        command = self._dist.broadcast_object(command)
        if command is None:
            return False
        self.spec = command.applied_to(self.spec)
        if self._committer is not None:
            self._committer.spec = self.spec
        if command.reload:
            # Not the checkpoint the block starts from (someone else trained the lineage since): load it.
            restored = self._load()
            if restored is None:
                raise LoopError(f"block {self.spec.index} starts from {command.start_id}, which is not in the store")
            self._apply(restored)
            self._restore_rng()
        if self.rank == 0:
            log.info("block %d continues in the same worker group (no restart)", self.spec.index)
        return True

    def _settle(self) -> None:
        """The last save committed and reported, on every rank."""
        self._drain_vote()
        error = self._committer.close() if self._committer else None
        self._dist.agree(error)
        self._send(self._pending_report)
        self._pending_report = None

    def loader(self, dataset: Any, batch_size: int, *, shuffle: bool = True, **kwargs: Any):
        """A `DataLoader` over this rank's shard of `dataset` whose position is saved in every
        checkpoint: after a mid-epoch resume it continues at the next unseen batch. Other keywords
        go to torchdata's `StatefulDataLoader` (num_workers, pin_memory, collate_fn...)."""
        from .loader import make_loader

        if "sampler" in kwargs or "batch_sampler" in kwargs:
            raise LoopError("ctx.loader shards the data over the ranks itself: pass no sampler/batch_sampler "
                            "(use shuffle=False for a fixed order)")
        loader = make_loader(dataset, batch_size, rank=self.rank, world_size=self.world_size,
                             seed=self.params.seed, shuffle=shuffle, **kwargs)
        self._loaders.append(loader)
        return loader

    def step(self, **metrics: float) -> None:
        """After each optimizer step: count it, add `metrics` to the epoch's means, commit a
        checkpoint every `checkpoint_every_steps` steps (and log the samples for the audit)."""
        self._add(metrics)
        epoch = self._require_epoch("ctx.step")
        self._audit()
        self._position = Position(epoch=epoch, batch_in_epoch=self._position.batch_in_epoch + 1,
                                  epoch_complete=False, step=self._position.step + 1)
        now = time.perf_counter()
        if self._last_step_at is not None:
            self._step_s = now - self._last_step_at
        self._last_step_at = now
        every = self.spec.settings.checkpoint_every_steps
        if every and self._position.step % every == 0 and self._mid_epoch_checkpoint_possible():
            self._checkpoint(report=False)
        self._vote_on_notice()
        faults.at_batch(self.spec.settings.fail, self.store, self.spec.lineage, self.rank, epoch, self._position.batch_in_epoch)

    def end_epoch(self, **metrics: float) -> dict[str, float]:
        """At the end of each epoch, on every rank: commit the epoch. `metrics` (validation...) are
        averaged over the ranks and stored with the step metrics' epoch means. Returns them."""
        epoch = self._require_epoch("ctx.end_epoch")
        self._audit()
        vote, self._notice_vote = self._notice_vote, None
        if vote is not None and self._dist.finish_any(vote):
            self._stop_after_epoch = True  # a notice during the epoch's last step: stop after its commit
        self._position = self._position.model_copy(update={"epoch": epoch, "epoch_complete": True})
        reduced = self._checkpoint(report=True, epoch_metrics=metrics)
        self._sums, self._counts, self._epoch_ended = {}, {}, True
        if self._stop_after_epoch:
            self._preempted(time.perf_counter())
        return reduced

    # ---- also useful
    def prepare_model(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        """`ray.train.torch.prepare_model` under Ray Train; on one process, the model on `ctx.device`."""
        if self._in_ray_train():
            import ray.train.torch

            return ray.train.torch.prepare_model(model, **kwargs)
        return model.to(self.device)

    def dataset_shard(self, name: str):
        """This rank's shard of the Ray Data set `name` (`datasets` in the config). Ray Data keeps no
        position, so a loop that reads one commits at epoch ends only: an interrupted epoch is
        trained again from its start (exactly: the epoch's start state is the last checkpoint)."""
        import ray.train

        self._uses_dataset_shards = True
        return ray.train.get_dataset_shard(name)

    # ---- Baton's side
    def finish(self) -> None:
        """After the loop returns: the last background save is committed, the block is complete."""
        if not self._exhausted:
            raise LoopError(f"the training loop returned before ctx.epochs() reached epoch {self.spec.end_epoch}: "
                            "iterate `for epoch in ctx.epochs():` to its end")
        self._settle()
        self._close_watchers()

    def abandon(self) -> None:
        """Training failed: let a save in flight finish (its snapshot is consistent), no collectives."""
        self._close_watchers()
        if self._committer:
            self._committer.abandon()

    def _send(self, line: dict[str, Any] | None) -> None:
        # Every rank has the same reduced line; `ray.train.report` is a barrier all ranks call.
        if line is not None:
            self._report(line)

    def _in_ray_train(self) -> bool:
        return self._ray_train

    def _require_epoch(self, call: str) -> int:
        if self._epoch is None:
            raise LoopError(f"{call} is called inside `for epoch in ctx.epochs():`")
        return self._epoch

    def _begin_epoch(self, epoch: int, resume: bool) -> None:
        # `resume`: the first epoch after a restore that stopped mid-epoch.
        self._epoch, self._epoch_ended = epoch, False
        if not resume:
            self._position = Position(epoch=epoch, batch_in_epoch=0, epoch_complete=False, step=self._position.step)
            if self._restored is None or self._restored.position.epoch != epoch:
                self._sums, self._counts = {}, {}
        pending = self._pending_loader_states() if resume else None
        for i, loader in enumerate(self._loaders):
            loader.set_epoch(epoch)
            if pending is not None and i < len(pending) and "loader" not in faults.omitted():
                loader.load_state_dict(pending[i])
            loader.audit_from(loader.batches_done if resume and pending else 0)
        self._restored = None

    def _mid_epoch_checkpoint_possible(self) -> bool:
        # A mid-epoch position is only restorable through ctx.loader; at the loader's last batch
        # the epoch-end commit follows (the same step would otherwise be committed twice).
        if self._uses_dataset_shards or not self._loaders:
            return False
        return all(loader.batches_done < len(loader) for loader in self._loaders)

    def _add(self, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            value = float(value.detach().float().item() if isinstance(value, torch.Tensor) else value)
            if not math.isfinite(value):
                # Nothing from this step on is committed: the last checkpoint stays the newest.
                raise NonFiniteMetric(
                    f"{name} is {value} at epoch {self._epoch} step {self._position.step + 1} on rank {self.rank}: "
                    f"training diverged, so no checkpoint is committed from this step on (the newest is the "
                    f"last good one). Lower the learning rate (--lr) or check the data, then run again")
            self._sums[name] = self._sums.get(name, 0.0) + value
            self._counts[name] = self._counts.get(name, 0.0) + 1

    def _audit(self) -> None:
        if self.spec.settings.sample_log:
            for loader in self._loaders:
                loader.write_audit(self.spec.settings.sample_log, self.rank)

    # ---- checkpoints
    def _checkpoint(self, report: bool, epoch_metrics: dict[str, float] | None = None) -> dict[str, float]:
        # Collectives first, in the same order on every rank; the background save does none.
        sums, counts = self._dist.sum_dicts(self._sums, self._counts)
        metrics = {k: sums[k] / max(counts[k], 1.0) for k in sums}
        if epoch_metrics:
            metrics.update(self._dist.mean_dict({k: float(v) for k, v in epoch_metrics.items()}))
        self._sums = sums if self.rank == 0 else {}  # the totals are carried on by rank 0
        self._counts = counts if self.rank == 0 else {k: 0.0 for k in counts}
        ranks = self._dist.gather_object({"rng": capture_rng(),
                                          "loaders": [loader.state_dict() for loader in self._loaders]})
        error = None
        if self._committer is not None:
            error = self._committer.commit(self._training_state(ranks, sums, counts), metrics)
        self._dist.agree(error)
        self._committed_step = self._position.step
        line = {**metrics, "epoch": self._position.epoch, "step": self._position.step} if report else None
        if self.spec.settings.checkpoint_mode == "async":
            # Only now is the previous save known to be committed: report it, hold this one back.
            self._send(self._pending_report)
            self._pending_report = line
        else:
            self._send(line)
        return metrics

    def _pending_loader_states(self) -> list[Any] | None:
        state = self._restored
        if state is None or "loaders" not in state.extra:
            return None
        per_rank = state.extra["loaders"]
        if len(per_rank) != self.world_size:
            raise LoopError(f"the checkpoint holds data-loader positions for {len(per_rank)} ranks, this run has "
                            f"{self.world_size}: resume with the same number of workers")
        mine = per_rank[self.rank]
        if len(mine) != len(self._loaders):
            raise LoopError(f"the checkpoint holds {len(mine)} ctx.loader position(s), the loop made "
                            f"{len(self._loaders)}: create the same loaders, in the same order, before ctx.epochs()")
        return mine


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose state is saved: the same with or without a DDP wrapper."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _start_point(position: Position) -> tuple[int, int]:
    if position.epoch_complete:
        return position.epoch + 1, 0
    return position.epoch, position.batch_in_epoch
