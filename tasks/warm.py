"""Worker groups that outlive a block (the warm path).

Ray Train has no way to keep a worker group across `fit()` calls, so a flow run keeps one long
`fit()` per lineage instead, inside a detached actor, `WarmGroup`, that only the flow run's block
tasks talk to:

    block task k  --run_block(spec k)-->  WarmGroup  --command()-->  rank 0 of the workers
                  <--reached E_k--------             <--reached-----  (after committing epoch E_k)

Each block task still says "bring the lineage to epoch E, starting from checkpoint C" and returns
the checkpoint the workers committed, exactly as a fresh `fit()` would. The workers check that the
state they hold is C (the checkpoint they committed last) and reload it from the store when it is
not. Correctness never depends on this path: a missing, dead, stale (other fence or config) or
failed group is replaced by a fresh one, which starts from the store like any block.

A group ends when the flow's last block is done, when its training fails, or by itself when no
block came for `warm_idle_timeout_s` (its flow process died): the workers leave their loop, the
`fit()` returns (Ray removes its placement group) and the actor process exits.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any

import ray

from .spec import BlockSpec

log = logging.getLogger("baton.warm")
NAMESPACE = "baton"


def group_name(spec: BlockSpec, flow_run: str) -> str:
    return f"baton-warm-{spec.lineage}-{flow_run}"


def _key(spec: BlockSpec) -> dict[str, Any]:
    """What a group must share with a block to train it: the same training, under the same lease."""
    return {"lineage": spec.lineage, "fence": spec.fence, "config_hash": spec.config_hash,
            "settings": spec.settings.model_dump(mode="json"), "import_paths": spec.import_paths}


@ray.remote(num_cpus=0, max_concurrency=8, max_restarts=0)
class WarmGroup:
    """One lineage's worker group for one flow run. Methods run on the actor's threads."""

    def __init__(self, key: dict[str, Any], idle_timeout_s: float):
        self.key, self.idle_timeout_s = key, idle_timeout_s
        self._cond = threading.Condition()
        self._target: dict[str, Any] | None = None
        self._reached, self._last_id, self._pids = 0, None, set()
        self._fit: threading.Thread | None = None
        self._error: str | None = None
        self._stopping, self._active = False, time.monotonic()
        threading.Thread(target=self._watchdog, daemon=True, name="warm-watchdog").start()

    # ---- the block task's side
    def describe(self) -> dict[str, Any]:
        with self._cond:
            return {"key": self.key, "running": self._running(), "error": self._error, "pid": os.getpid()}

    def run_block(self, config: dict[str, Any], start_id: str | None) -> dict[str, Any]:
        """Bring the lineage to the block's end epoch; returns once the workers committed it."""
        spec = BlockSpec.model_validate(config)
        with self._cond:
            self._active = time.monotonic()
            self._target = {"index": spec.index, "end_epoch": spec.end_epoch, "fence": spec.fence,
                            "start_id": start_id, "last": spec.last}
            fresh = not self._running()
            if fresh:
                self._error, self._reached = None, 0
                self._fit = threading.Thread(target=self._train, args=(config,), daemon=True, name="warm-fit")
                self._fit.start()
            self._cond.notify_all()
            while self._reached < spec.end_epoch and self._running() and not self._error:
                self._cond.wait(1.0)
            self._active = time.monotonic()
            if self._reached >= spec.end_epoch:
                return {"fresh": fresh, "pids": sorted(self._pids), "checkpoint": self._last_id}
            raise RuntimeError(self._error or f"the worker group ended before epoch {spec.end_epoch} was committed")

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    # ---- rank 0's side
    def command(self, epochs_done: int, last_id: str | None, pid: int) -> dict[str, Any] | None:
        """The group reached `epochs_done`; wait for a block past it. None: leave the loop."""
        with self._cond:
            self._reached, self._last_id = epochs_done, last_id
            self._pids.add(pid)
            self._cond.notify_all()
            deadline = time.monotonic() + self.idle_timeout_s
            while not self._stopping:
                target = self._target
                if target is not None and target["end_epoch"] > epochs_done:
                    return dict(target)
                if target is not None and target["last"]:
                    return None  # the flow's last block is done: the group ends with it
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.info("no block for %.0f s: the worker group ends", self.idle_timeout_s)
                    return None
                self._cond.wait(min(remaining, 1.0))
            return None

    def current(self) -> dict[str, Any] | None:
        """The block in progress, for workers that (re)started inside it."""
        with self._cond:
            return dict(self._target) if self._target else None

    def note_pid(self, pid: int) -> None:
        with self._cond:
            self._pids.add(pid)

    # ---- inside
    def _running(self) -> bool:
        return self._fit is not None and self._fit.is_alive()

    def _train(self, config: dict[str, Any]) -> None:
        from ray.train import FailureConfig, RunConfig
        from ray.train.torch import TorchTrainer

        from .block import _datasets, _scaling
        from .worker import worker_loop

        spec = BlockSpec.model_validate(config)
        try:
            TorchTrainer(
                worker_loop, train_loop_config=config, scaling_config=_scaling(spec), datasets=_datasets(spec),
                run_config=RunConfig(name=f"baton-{spec.lineage}-warm-{uuid.uuid4().hex[:8]}",
                                     failure_config=FailureConfig(max_failures=spec.settings.max_failures)),
            ).fit()
        except BaseException as err:  # handed to the block task waiting in run_block
            with self._cond:
                self._error = f"{type(err).__name__}: {err}"
        finally:
            with self._cond:
                self._active = time.monotonic()
                self._cond.notify_all()

    def _watchdog(self) -> None:
        """Exit the actor process once no training runs and nothing happened for the idle timeout
        (or at once after the last block): nothing of the group is left behind."""
        while True:
            time.sleep(1.0)
            with self._cond:
                idle = time.monotonic() - self._active
                done = self._stopping or (self._target or {}).get("last") and self._reached >= self._target["end_epoch"]
                if not self._running() and (done or idle > self.idle_timeout_s):
                    os._exit(0)


def run_block(spec: BlockSpec, start_id: str | None, flow_run: str, logger) -> dict[str, Any]:
    """Hand the block to the flow run's warm group, starting (or replacing) it when needed."""
    name = group_name(spec, flow_run)
    group = _usable_group(name, spec, logger)
    if group is None:
        group = WarmGroup.options(name=name, namespace=NAMESPACE, lifetime="detached",
                                  get_if_exists=True).remote(_key(spec), spec.settings.warm_idle_timeout_s)
    return ray.get(group.run_block.remote(spec.model_dump(mode="json"), start_id))


def _usable_group(name: str, spec: BlockSpec, logger):
    try:
        group = ray.get_actor(name, namespace=NAMESPACE)
        state = ray.get(group.describe.remote(), timeout=30)
    except (ValueError, ray.exceptions.RayError):
        return None  # none yet, or gone
    if state["key"] == _key(spec):
        return group
    logger.info("the warm worker group of %s was started under another lease or config: replacing it", spec.lineage)
    ray.get(group.stop.remote())
    ray.kill(group)
    _wait_gone(name)
    return None


def _wait_gone(name: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.2)


def join_group(spec: BlockSpec) -> BlockSpec:
    """A worker (re)starting inside a warm group: note its process, take the block in progress
    (after a worker-group restart that may be a later block than the one the fit began with)."""
    group = ray.get_actor(spec.warm_group, namespace=NAMESPACE)
    ray.get(group.note_pid.remote(os.getpid()))
    current = ray.get(group.current.remote())
    if current is None:
        return spec
    return spec.model_copy(update={k: current[k] for k in ("index", "end_epoch", "fence", "last")})


def fetch_command(name: str, epochs_done: int, last_id: str | None) -> dict[str, Any] | None:
    """Rank 0, at the end of a block: the next block's command, or None when the group ends.
    `reload`: the state the workers hold is not the checkpoint the block starts from."""
    group = ray.get_actor(name, namespace=NAMESPACE)
    command = ray.get(group.command.remote(epochs_done, last_id, os.getpid()))
    if command is not None:
        command["reload"] = command.get("start_id") is not None and command["start_id"] != last_id
    return command
