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

`TrainContext` is that API and delegates the rest: what goes into and comes back from a checkpoint
to a `Resumer` (resume.py), rank 0's commits to a `Committer` (commit.py), stopping on a notice to
a `StopVote` (stop.py), the block in progress, the epoch's metric sums and the held-back report
lines to a `BlockCursor`, `EpochMeans` and `Reports` (progress.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Iterator

import torch

from ckpt import CheckpointStore, Position, TrainingState, capture_rng

from . import faults
from .collectives import Collectives
from .commit import Committer
from .errors import LoopError
from .loader import BatonLoader, RankLoaders
from .progress import BlockCursor, EpochMeans, Reports
from .recipes import RecipeParams
from .resume import Resumer
from .spec import BlockSpec
from .stop import Stop, StopVote
from .watchdog import StepWatchdog

__all__ = ["TrainContext"]

log = logging.getLogger("baton.worker")


class TrainContext:
    """What one rank of a block sees. Built by Baton; a loop only calls its methods."""

    def __init__(self, spec: BlockSpec, rank: int, world_size: int, *, local_rank: int = 0,
                 device: torch.device | None = None, report: Callable[[dict[str, Any]], None] | None = None,
                 ray_train: bool = False):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device or torch.device("cpu")
        self.store = CheckpointStore(spec.settings.store, spec.settings.storage_options)
        self._cursor = BlockCursor(spec)
        self._ray_train = ray_train
        self._dist = Collectives(world_size)
        self._resumer = Resumer(self.store, spec.lineage, spec.settings, rank=rank, world_size=world_size,
                                seed=spec.params.seed)
        background = spec.settings.checkpoint_mode == "async"
        self._committer = Committer(self.store, spec.lineage, background=background) if rank == 0 else None
        self._stop = StopVote(self._dist, rank)
        self._means = EpochMeans(rank)
        self._reports = Reports(report or (lambda metrics: None), hold_until_committed=background)
        self._objects: dict[str, Any] = {}
        self._user_state: dict[str, Any] = {}
        self._loaders = RankLoaders(rank, world_size, spec.params.seed)
        self._restored: TrainingState | None = None  # until its loader positions and RNG are applied
        self._position = Position(epoch=0, batch_in_epoch=0, epoch_complete=False, step=0)
        self._epoch: int | None = None
        self._epoch_ended = True
        self._committed_step = -1
        self._uses_dataset_shards = False
        self._exhausted = False
        self._created = time.perf_counter()
        self.ready_s: float | None = None
        self._watchdog: StepWatchdog | None = None  # under Ray Train: a rank that hangs is stopped

    # ---- what a loop reads
    @property
    def spec(self) -> BlockSpec:
        """The block this rank trains now (in a warm group, the next block once the last one ended)."""
        return self._cursor.block

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
        """Optimizer steps (`ctx.step` calls) since the lineage began."""
        return self._position.step

    @property
    def batch_in_epoch(self) -> int:
        """Batches of this epoch the (first) ctx.loader has yielded, those before a resume included:
        inside `for batch in loader:` the 1-based number of the batch in hand."""
        return self._loaders.first("ctx.batch_in_epoch").batches_done

    @property
    def batches_in_epoch(self) -> int:
        """The batches an epoch of the (first) ctx.loader has on this rank (the same on every rank)."""
        return len(self._loaders.first("ctx.batches_in_epoch"))

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
        objects = {"model": _unwrap(model), "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler,
                   **stateful}
        self._objects = {k: v for k, v in objects.items() if v is not None}
        for name, obj in self._objects.items():
            if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise LoopError(f"ctx.restore({name}=...) got a {type(obj).__name__}, which has no "
                                "state_dict()/load_state_dict(); pass JSON values in state={...} instead")
        if self.device.type != "cpu":
            # Before loading: optimizer state lands on the device of the parameters it belongs to.
            self._objects["model"].to(self.device)
        self._user_state = dict(state or {})
        self._resume()
        return self._user_state

    def epochs(self) -> Iterator[int]:
        """The epochs this block trains, from the resume point; commits each epoch that the loop
        did not end itself with `end_epoch`. In a warm worker group it goes on with the next block
        of the flow run when there is one, so the loop never learns where one block ends."""
        if not self._objects:
            raise LoopError("call ctx.restore(model=..., optimizer=...) before ctx.epochs()")
        self._resumer.restore_rng(self._restored, self._position.step)
        self._watch()
        if self.rank == 0:
            self.ready_s = time.perf_counter() - self._created
            log.info("block %d ready to train in %.2f s", self.spec.index, self.ready_s)
        while True:
            epoch, resume = _start_point(self._position)
            while epoch < self.spec.end_epoch:
                self._begin_epoch(epoch, resume=resume)
                resume = False
                self._fault_point(epoch)
                yield epoch
                if not self._epoch_ended:
                    self.end_epoch()
                epoch += 1
            if not self._next_block():
                break
        self._exhausted = True

    def loader(self, dataset: Any, batch_size: int, *, shuffle: bool = True, **kwargs: Any) -> BatonLoader:
        """A `DataLoader` over this rank's shard of `dataset` whose position is saved in every
        checkpoint: after a mid-epoch resume it continues at the next unseen batch. Other keywords
        go to torchdata's `StatefulDataLoader` (num_workers, pin_memory, collate_fn...)."""
        return self._loaders.make(dataset, batch_size, shuffle=shuffle, **kwargs)

    def step(self, **metrics: float) -> None:
        """After each optimizer step: count it, add `metrics` to the epoch's means, commit a
        checkpoint every `checkpoint_every_steps` steps (and log the samples for the audit)."""
        epoch = self._require_epoch("ctx.step")
        if self._loaders.window_open:
            raise LoopError("ctx.step in the middle of an accumulation window: step the optimizer and call "
                            "ctx.step only where `for batch, step in ctx.accumulate(...)` gives step=True")
        self._means.add(metrics, epoch=epoch, step=self._position.step + 1)
        self._loaders.audit(self.spec.settings.sample_log)
        self._position = Position(epoch=epoch, batch_in_epoch=self._data_position(), epoch_complete=False,
                                  step=self._position.step + 1)
        if self._watchdog is not None:
            self._watchdog.beat(self._position.step, epoch_end_next=bool(self._loaders) and not self._loaders.mid_epoch())
        every = self.spec.settings.checkpoint_every_steps
        if every and self._position.step % every == 0 and self._mid_epoch_checkpoint_possible():
            self._checkpoint(report=False)
        self._vote_on_notice()
        self._fault_point(epoch)

    def end_epoch(self, **metrics: float) -> dict[str, float]:
        """At the end of each epoch, on every rank: commit the epoch. `metrics` (validation...) are
        averaged over the ranks and stored with the step metrics' epoch means. Returns them."""
        epoch = self._require_epoch("ctx.end_epoch")
        self._loaders.audit(self.spec.settings.sample_log)
        stop_after = self._stop.at_epoch_end()
        self._position = self._position.model_copy(update={"epoch": epoch, "epoch_complete": True})
        reduced = self._checkpoint(report=True, epoch_metrics=metrics)
        self._means.reset()
        self._epoch_ended = True
        if stop_after:
            self._stop_here(time.perf_counter())
        return reduced

    # ---- also useful
    def accumulate(self, loader: BatonLoader, every: int) -> Iterator[tuple[Any, bool]]:
        """Gradient accumulation over `loader` (a ctx.loader): yields `(batch, step)`, `step` True
        on the micro-batch that ends a window of `every` (counted from the epoch's start, also after
        a mid-epoch resume) and on the epoch's last batch, which ends a shorter window. Step the
        optimizer and call `ctx.step` exactly there: checkpoints are taken at `ctx.step`, so none
        splits a window (the gradients of a half-done window are not saved)."""
        return self._loaders.accumulate(loader, every)

    def prepare_model(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        """`ray.train.torch.prepare_model` under Ray Train; on one process, the model on `ctx.device`."""
        if self._ray_train:
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
        self._stop.close()
        self._watchdog and self._watchdog.close()

    def abandon(self) -> None:
        """Training failed: let a save in flight finish (its snapshot is consistent), no collectives."""
        self._stop.close()
        self._watchdog and self._watchdog.close()
        if self._committer:
            self._committer.abandon()

    # ---- resume and blocks
    def _resume(self, required: str | None = None) -> None:
        """Load the start checkpoint (`required`: the id the block names, which must be in the store)."""
        start = self._resumer.find()
        if required is not None and (start.state is None or start.weights_only):
            raise LoopError(f"block {self.spec.index} starts from {required}, which is not in the store")
        if self._committer is not None and start.parent is not None:
            self._committer.resumed_from(start.parent)
        restored = self._resumer.apply(start, self._objects, self._user_state)
        if restored is not None:
            self._position, self._restored = restored.position, restored
            if not restored.position.epoch_complete:  # a mid-epoch resume continues the epoch's means
                self._means.resume(restored.progress)

    def _next_block(self) -> bool:
        """Warm group: report the block's end (its last checkpoint committed) and wait for the next."""
        if not self.spec.warm_group:
            return False
        with self._paused():  # the wait for the next block is no step
            self._settle()
            command = None
            if self.rank == 0:
                from .group import fetch_command

                last = self._committer.parent if self._committer else None
                command = fetch_command(self.spec.warm_group, self._position.epochs_done, last)
            command = self._dist.broadcast_object(command)
        if command is None:
            return False
        self._cursor.advance(command)
        self._watch()
        if command.reload:
            # Not the checkpoint the block starts from (someone else trained the lineage since): load it.
            self._resume(required=command.start_id)
            self._resumer.restore_rng(self._restored, self._position.step)
        if self.rank == 0:
            log.info("block %d continues in the same worker group (no restart)", self.spec.index)
        return True

    def _watch(self) -> None:
        block = self.spec
        self._stop.watch(self.store, block.lineage, block.fence, notices=self.rank == 0, drain=self._ray_train)
        if not self._ray_train:
            return  # one process (run_local): no other rank waits on this one
        if self._watchdog is None:
            self._watchdog = StepWatchdog(self.store, block.lineage, block.fence, self.rank,
                                          timeout_s=block.settings.step_timeout_s,
                                          noticed=lambda: self._stop.noticed).start()
        self._watchdog.fence = block.fence

    def _paused(self):
        """Baton's own long phases (a commit, the wait for the next block) do not count as a hang."""
        return self._watchdog.paused() if self._watchdog is not None else contextlib.nullcontext()

    def _begin_epoch(self, epoch: int, resume: bool) -> None:
        # `resume`: the first epoch after a restore that stopped mid-epoch.
        self._epoch, self._epoch_ended = epoch, False
        if not resume:
            self._position = Position(epoch=epoch, batch_in_epoch=0, epoch_complete=False, step=self._position.step)
            self._means.reset()
        saved = self._resumer.loader_states(self._restored, len(self._loaders)) if resume else None
        self._loaders.begin_epoch(epoch, saved)
        self._restored = None

    # ---- steps, stops, checkpoints
    def _vote_on_notice(self) -> None:
        decision = self._stop.at_step(committable=self._mid_epoch_checkpoint_possible(),
                                      epoch_end_follows=bool(self._loaders))
        if decision is Stop.AT_STEP:
            self._stop_here(time.perf_counter())
        elif decision is Stop.WITHOUT_CHECKPOINT:
            self._stop.stop(self._position, self._last_committed(), where="no checkpoint of the step")

    def _stop_here(self, started: float) -> None:
        """Every rank is at this step: commit it (if not yet), settle, raise `Preempted`."""
        if self._committed_step != self._position.step:
            self._checkpoint(report=False)
        self._settle()
        self._stop.stop(self._position, self._last_committed(), saved_s=time.perf_counter() - started)

    def _settle(self) -> None:
        """The last save committed and reported, on every rank."""
        with self._paused():
            self._stop.settle()
            error = self._committer.close() if self._committer else None
            self._dist.agree(error)
            self._reports.flush()

    def _checkpoint(self, report: bool, epoch_metrics: dict[str, float] | None = None) -> dict[str, float]:
        # Collectives first, in the same order on every rank; the background save does none.
        with self._paused():
            metrics, progress = self._means.reduce(self._dist, epoch_metrics)
            ranks = self._dist.gather_object({"rng": capture_rng(), "loaders": self._loaders.state_dicts()})
            error = None
            if self._committer is not None:
                state = self._resumer.capture(self._objects, self._user_state, self._position, ranks, progress)
                error = self._committer.commit(state, metrics, self.spec)
            self._dist.agree(error)
        self._committed_step = self._position.step
        self._reports.committed({**metrics, "epoch": self._position.epoch, "step": self._position.step}
                                if report else None)
        return metrics

    def _last_committed(self) -> str | None:
        return self._committer.parent if self._committer else None

    def _mid_epoch_checkpoint_possible(self) -> bool:
        # A mid-epoch position is only restorable through ctx.loader (Ray Data keeps none).
        return not self._uses_dataset_shards and self._loaders.mid_epoch()

    def _data_position(self) -> int:
        # The batches trained, as the loaders count them (with accumulation, several a step).
        # Without a ctx.loader (no mid-epoch checkpoint then): one a step.
        return self._loaders.batches_done() if self._loaders else self._position.batch_in_epoch + 1

    def _fault_point(self, epoch: int) -> None:
        faults.at_batch(self.spec.settings.fail, self.store, self.spec.lineage, self.rank, epoch,
                        self._position.batch_in_epoch)

    def _require_epoch(self, call: str) -> int:
        if self._epoch is None:
            raise LoopError(f"{call} is called inside `for epoch in ctx.epochs():`")
        return self._epoch


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose state is saved: the same with or without a DDP wrapper."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _start_point(position: Position) -> tuple[int, bool]:
    """The epoch to train next, and whether it is resumed half-way (its loaders' positions saved)."""
    if position.epoch_complete:
        return position.epoch + 1, False
    return position.epoch, position.batch_in_epoch > 0
