"""The Ray Train worker loop: restore, train, commit a checkpoint every epoch (and every N steps).

Runs on every rank. Rank 0 writes and commits checkpoints; every rank contributes its RNG state,
so that a resumed run continues bit for bit (DESIGN invariant 7).
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset, default_collate

import ray.train
import ray.train.torch
from ckpt import (CheckpointCorrupted, CheckpointStore, Lease, Manifest, Position, ResumableSampler,
                  TrainingState, capture_rng, decode, encode, restore_rng)
from ckpt import _io, checkpoint_id
from ckpt.async_save import AsyncSaver

from .recipes import Recipe, load_recipe
from .spec import BlockSpec

log = logging.getLogger("baton.worker")


@dataclass
class _Run:
    spec: BlockSpec
    recipe: Recipe
    rank: int
    world: int
    store: CheckpointStore
    model: torch.nn.Module
    ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data: Any
    sampler: ResumableSampler
    position: Position
    parent: str | None = None
    progress: dict[str, float] = field(default_factory=lambda: {"loss_sum": 0.0, "batches": 0.0})
    saver: AsyncSaver | None = None  # rank 0 in async mode
    pending_report: dict[str, float] | None = None  # async: reported once its checkpoint is committed


def worker_loop(config: dict[str, Any]) -> None:
    entered = time.perf_counter()
    spec = BlockSpec.model_validate(config)
    torch.set_num_threads(1)  # a fixed thread count keeps float reductions identical across resumes
    context = ray.train.get_context()
    run = _build(spec, context.get_world_rank(), context.get_world_size())
    epoch, batch = _start_point(run.position)
    if run.rank == 0:  # the block-boundary cost that is Baton's own (Ray's worker start comes before)
        log.info("block %d ready to train in %.2f s", spec.index, time.perf_counter() - entered)
    try:
        while epoch < spec.end_epoch:
            _train_epoch(run, epoch, batch)
            epoch, batch = epoch + 1, 0
    except BaseException:
        _abandon(run)
        raise
    finishing = time.perf_counter()
    _finish(run)
    if run.saver is not None:
        log.info("block %d: waited %.2f s for the last background save", spec.index, time.perf_counter() - finishing)


def _build(spec: BlockSpec, rank: int, world: int) -> _Run:
    recipe = load_recipe(spec.recipe)
    data = recipe.build_data(spec.params)
    torch.manual_seed(spec.params.seed)
    model = recipe.build_model(spec.params)
    optimizer = recipe.build_optimizer(model.parameters(), spec.params)
    scheduler = recipe.build_scheduler(optimizer, spec.params) if recipe.build_scheduler else None
    store = CheckpointStore(spec.store, spec.storage_options)
    run = _Run(spec, recipe, rank, world, store, model, model, optimizer, scheduler, data,
               ResumableSampler(len(data.train), spec.params.batch_size, rank, world, spec.params.seed),
               Position(epoch=0, batch_in_epoch=0, epoch_complete=False, step=0))
    if spec.checkpoint_mode == "async" and rank == 0:
        run.saver = AsyncSaver(name=f"baton-save-{spec.lineage}")
    resume, files = _load_latest(store, spec.lineage)
    if resume is not None:
        restored = _restore(run, resume, files)
    elif spec.init_from:
        restored = _warm_start(run)
    else:
        restored = None
    run.ddp = ray.train.torch.prepare_model(model) if world > 1 else model
    # Restore each rank's RNG last, just before the first forward pass.
    if restored is not None and len(restored.rng) == world and "rng" not in _omitted():
        restore_rng(restored.rng[rank])
    else:
        if restored is not None and len(restored.rng) != world:
            log.warning("checkpoint has RNG states for %d ranks, this run has %d: reseeding, so this "
                        "resume is not bit-exact", len(restored.rng), world)
        _seed_rank(spec.params.seed, rank, run.position.step)
    return run


def _omitted() -> set[str]:
    """Test-only switch: state deliberately left out of restore, to show the exactness tests bite."""
    return set(filter(None, os.environ.get("BATON_TEST_OMIT_STATE", "").split(",")))


def _warm_start(run: _Run) -> TrainingState | None:
    """Start a new lineage from another lineage's weights (or, in `full` mode, its whole state)."""
    source, _, selector = run.spec.init_from.partition("@")
    manifest = run.store.resolve(source, selector or "latest")
    state = decode({name: run.store.read(manifest, name) for name in manifest.files})
    run.model.load_state_dict(state.model)
    run.parent = f"{source}/{manifest.id}"
    if run.rank == 0:
        log.info("warm start of %s from %s (%s)", run.spec.lineage, run.parent, run.spec.init_mode)
    if run.spec.init_mode == "weights":
        return None
    _load_training_state(run, state)
    return state


def _load_training_state(run: _Run, state: TrainingState) -> None:
    """Optimizer, scheduler and the recipe's custom state (the model is loaded by the caller)."""
    if state.optimizer is not None:
        run.optimizer.load_state_dict(state.optimizer)
    if run.scheduler is not None and state.scheduler is not None:
        run.scheduler.load_state_dict(state.scheduler)
    if run.recipe.load_extra_state is not None:
        run.recipe.load_extra_state(run.model, state.extra)


def _seed_rank(seed: int, rank: int, step: int) -> None:
    import random

    import numpy as np

    value = (seed * 1_000_003 + rank * 7919 + step) % 2**32
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def _load_latest(store: CheckpointStore, lineage: str) -> tuple[Manifest | None, dict[str, bytes]]:
    """The newest committed checkpoint whose files verify, and those files: each read once, since
    verifying already reads them all (a resume used to read and hash the state twice)."""
    for manifest in reversed(store.list(lineage)):
        try:
            return manifest, {name: store.read(manifest, name) for name in manifest.files}
        except CheckpointCorrupted as err:
            log.warning("skipping corrupted checkpoint %s/%s: %s", lineage, manifest.id, err)
    return None, {}


def _restore(run: _Run, manifest: Manifest, files: dict[str, bytes]) -> TrainingState:
    state = decode(files)
    run.model.load_state_dict(state.model)
    _load_training_state(run, state)
    run.position, run.parent = state.position, manifest.id
    if not state.position.epoch_complete:  # a mid-epoch resume continues the epoch's loss sums
        run.progress = {k: float(v) for k, v in state.progress.items()} or run.progress
    if run.rank == 0:
        log.info("resuming %s from %s (epoch %d, batch %d, step %d)", run.spec.lineage, manifest.id,
                 state.position.epoch, state.position.batch_in_epoch, state.position.step)
    return state


def _start_point(position: Position) -> tuple[int, int]:
    if position.epoch_complete:
        return position.epoch + 1, 0
    return position.epoch, position.batch_in_epoch


def _batch(dataset, indices: list[int]):
    # Indexing directly (no DataLoader iterator) draws nothing from the global RNG.
    if isinstance(dataset, TensorDataset):
        return tuple(t[indices] for t in dataset.tensors)
    return default_collate([dataset[i] for i in indices])


def _train_epoch(run: _Run, epoch: int, start_batch: int) -> None:
    spec, every = run.spec, run.spec.checkpoint_every_steps
    run.sampler.set_position(epoch, start_batch)
    batches = run.sampler.batches_per_epoch()
    run.ddp.train()
    for batch, indices in enumerate(run.sampler, start=start_batch):
        _maybe_fail(run, "batch", epoch, batch)
        if spec.sample_log:
            _log_samples(run, epoch, batch, indices)
        inputs, targets = _batch(run.data.train, indices)
        run.optimizer.zero_grad()
        loss = run.recipe.loss(run.ddp(inputs), targets)
        loss.backward()
        run.optimizer.step()
        if run.recipe.after_step is not None:
            run.recipe.after_step(run.model)
        run.progress["loss_sum"] += loss.item()
        run.progress["batches"] += 1
        run.position = Position(epoch=epoch, batch_in_epoch=batch + 1, epoch_complete=batch + 1 == batches,
                                step=run.position.step + 1)
        if every and run.position.step % every == 0 and batch + 1 < batches:
            _checkpoint(run, report=False)
    if run.scheduler is not None:
        run.scheduler.step()
    _checkpoint(run, report=True)
    run.progress = {"loss_sum": 0.0, "batches": 0.0}


_ATTEMPT = os.urandom(4).hex()  # one per worker process: tells a retried batch from the first try


def _log_samples(run: _Run, epoch: int, batch: int, indices: list[int]) -> None:
    """Audit trail of the samples each rank trained on (`sample_log`), one JSON line per batch."""
    os.makedirs(run.spec.sample_log, exist_ok=True)
    line = json.dumps({"attempt": _ATTEMPT, "epoch": epoch, "batch": batch, "rank": run.rank, "indices": indices})
    with open(os.path.join(run.spec.sample_log, f"rank{run.rank}.jsonl"), "a") as handle:
        handle.write(line + "\n")


def _metrics(run: _Run) -> dict[str, float]:
    totals = torch.tensor([run.progress["loss_sum"], run.progress["batches"]], dtype=torch.float64)
    if run.world > 1:
        dist.all_reduce(totals)
    metrics = {"loss": (totals[0] / max(totals[1].item(), 1.0)).item()}
    if run.recipe.evaluate is not None and run.data.validation is not None and run.position.epoch_complete:
        run.model.eval()
        metrics.update(run.recipe.evaluate(run.model, run.data.validation))
        run.model.train()
    return metrics


def _checkpoint(run: _Run, report: bool) -> None:
    # Collectives first, in the same order on every rank; the background save does none.
    metrics = _metrics(run)
    rngs: list[Any] = [None] * run.world
    if run.world > 1:
        dist.all_gather_object(rngs, capture_rng())
    else:
        rngs = [capture_rng()]
    error: list[BaseException] = []
    if run.rank == 0:
        try:
            if run.saver is None:
                run.parent = _commit(run, rngs, metrics).id
            else:
                _commit_async(run, rngs, metrics)
        except BaseException as err:  # every rank must learn of it, or the others hang in the next collective
            error.append(err)
    _agree_on_failure(run, error)
    line = {**metrics, "epoch": run.position.epoch, "step": run.position.step} if report else None
    if run.spec.checkpoint_mode == "async":
        # Only now is the previous save known to be committed: report it, and hold this one back.
        _report(run.pending_report)
        run.pending_report = line
    else:
        _report(line)


def _report(line: dict[str, float] | None) -> None:
    if line is not None:
        ray.train.report(line)


def _agree_on_failure(run: _Run, error: list[BaseException]) -> None:
    """Rank 0 tells every rank whether its save failed; all ranks must call this."""
    failed = torch.tensor([1 if error else 0])
    if run.world > 1:
        dist.broadcast(failed, src=0)
    if error:
        raise error[0]
    if failed.item():
        raise RuntimeError("rank 0 failed to commit the checkpoint; see its log")


def _finish(run: _Run) -> None:
    """End of the block in async mode: the last save must be committed (and reported) before
    the worker returns, or the block would end without its final checkpoint."""
    if run.spec.checkpoint_mode != "async":
        return
    error: list[BaseException] = []
    if run.saver is not None:
        try:
            run.saver.close()
        except BaseException as err:
            error.append(err)
    _agree_on_failure(run, error)
    _report(run.pending_report)
    run.pending_report = None


def _abandon(run: _Run) -> None:
    """Training failed: let a save in flight finish (its snapshot is consistent), without collectives."""
    if run.saver is not None and run.saver.in_flight:
        try:
            run.saver.close()
        except Exception as err:
            log.error("the background save in flight when training failed did not commit: %s", err)


def _training_state(run: _Run, rngs: list[Any]) -> TrainingState:
    extra = run.recipe.extra_state(run.model) if run.recipe.extra_state else {}
    return TrainingState(model=run.model.state_dict(), position=run.position,
                         optimizer=run.optimizer.state_dict(),
                         scheduler=run.scheduler.state_dict() if run.scheduler is not None else None,
                         rng=rngs, progress=dict(run.progress), extra=extra)


def _commit(run: _Run, rngs: list[Any], metrics: dict[str, float]) -> Manifest:
    return _write(run, _training_state(run, rngs), metrics, run.parent)


def _commit_async(run: _Run, rngs: list[Any], metrics: dict[str, float]) -> None:
    """Snapshot now (the only part training waits for), write and commit in the background."""
    state, parent = _training_state(run, rngs), run.parent
    ckpt_id = checkpoint_id(state.position.epoch, state.position.step)
    run.saver.save(state, lambda snapshot: _write(run, snapshot, metrics, parent), label=ckpt_id)
    log.debug("checkpoint %s: training stalled %.3f s (%.3f s waiting for the previous save)",
              ckpt_id, run.saver.last_stall_s, run.saver.last_wait_s)
    # The id is fixed by the position, so the next checkpoint can name its parent already.
    run.parent = ckpt_id


def _write(run: _Run, state: TrainingState, metrics: dict[str, float], parent: str | None) -> Manifest:
    files = encode(state)
    spec, position = run.spec, state.position

    def before_commit() -> None:
        # Files are written, the manifest is not: the moment a crash must never expose.
        _maybe_fail(run, "commit", position.epoch, position.batch_in_epoch - 1)
        if spec.fence:
            Lease.check(run.store, spec.lineage, spec.fence)

    return run.store.commit(spec.lineage, position, files, metrics=metrics,
                            config_hash=spec.config_hash, parent=parent, versions=dict(_versions()),
                            fence=spec.fence, before_commit=before_commit)


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    out = {}
    for package in ("torch", "ray", "safetensors", "baton"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _maybe_fail(run: _Run, phase: str, epoch: int, batch: int) -> None:
    fail = run.spec.fail
    if fail is None or (fail.phase, fail.epoch, fail.batch, fail.rank) != (phase, epoch, batch, run.rank):
        return
    # A marker per firing, created exclusively in the store, so a retry does not fail forever.
    fired = any(_io.write_exclusive(run.store.fs, run.store.path(run.spec.lineage, "_faults", f"{phase}-{epoch}-{batch}-{n}"), b"")
                for n in range(fail.times))
    if not fired:
        return
    if fail.action == "kill-worker":
        log.warning("failure injection: SIGKILL of rank %d at %s %d/%d", run.rank, phase, epoch, batch)
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"failure injection: rank {run.rank} fails at {phase} of epoch {epoch} batch {batch}")
