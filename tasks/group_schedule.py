"""The warm worker group's schedule: which block the group trains, how far its workers got, and
when the group ends. A plain object under one condition variable, so the protocol runs (and is
tested) without Ray; `tasks.warm.WarmGroup`, the detached actor, wraps it and gives it the fit.

    block task k --take_block(spec k)--> schedule <--command(reached E)-- rank 0, at a block's end
                 <--BlockResult---------          --BlockCommand k+1-->
    a worker (re)starting inside the fit --current()--> the block in progress

One fit (one long Ray Train run) trains every block handed over while it runs; `take_block` starts
a new one when none runs (the first block, or after the last fit ended or failed). Every wait
wakes on a change and re-checks at least every `tick_s`; time comes from `clock`, so the idle
rules can be tested on a fake one.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from .errors import GroupFailed
from .runtime.group import BlockCommand, BlockResult, GroupKey, GroupState
from .runtime.spec import BlockSpec

log = logging.getLogger("baton.warm")

Fit = Callable[[BlockSpec], None]  # runs the group's workers for `spec` until they leave their loop


class GroupSchedule:
    """One lineage's warm group for one flow run, as the block tasks and rank 0 see it."""

    def __init__(self, key: GroupKey, idle_timeout_s: float, fit: Fit, *,
                 clock: Callable[[], float] = time.monotonic, tick_s: float = 1.0):
        self.key, self.idle_timeout_s = key, idle_timeout_s
        self._fit, self._clock, self._tick_s = fit, clock, tick_s
        self._cond = threading.Condition()
        self._target: BlockCommand | None = None
        self._reached, self._last_id = 0, None
        # Every worker process, node and placement group the group ran in: for the block task's
        # watch (a lost node) and for the clean-up of a lost group.
        self._pids: set[int] = set()
        self._nodes: set[str] = set()
        self._pgs: set[str] = set()
        self._fitting, self._prestarted = False, False
        self._error: BaseException | None = None  # what the last fit raised, as it was
        self._stopping, self._active = False, clock()

    # ---- the block task's side
    def state(self, pid: int, node: str) -> GroupState:
        """The group as the block task sees it; `pid` and `node` are the actor's."""
        with self._cond:
            error = f"{type(self._error).__name__}: {self._error}" if self._error else None
            return GroupState(key=self.key, running=self._fitting, error=error, pid=pid, node=node,
                              nodes=sorted(self._nodes), pgs=sorted(self._pgs))

    def take_block(self, spec: BlockSpec, start_id: str | None) -> BlockResult:
        """Bring the lineage to the block's end epoch; returns once the workers committed it.
        A fit that ends first raises GroupFailed, from the error the fit raised if it raised one."""
        with self._cond:
            self._active = self._clock()
            if self.key.fence is None:  # prestarted: the first block brings the lease's fence
                self.key = self.key.model_copy(update={"fence": spec.fence})
            self._target = BlockCommand.of(spec, start_id)
            start = not self._fitting
            fresh = start or self._reached == 0  # the group's first block (started now, or prestarted)
            if start:
                self._start(spec)
            self._cond.notify_all()
            while self._reached < spec.end_epoch and self._fitting:
                self._cond.wait(self._tick_s)
            self._active = self._clock()
            if self._reached >= spec.end_epoch:
                return BlockResult(fresh=fresh, prestarted=fresh and self._prestarted and not start,
                                   pids=sorted(self._pids), checkpoint=self._last_id)
            why = f": {type(self._error).__name__}: {self._error}" if self._error else ""
            raise GroupFailed(f"the warm worker group ended before epoch {spec.end_epoch} was committed{why}") \
                from self._error

    def prestart(self, spec: BlockSpec) -> None:
        """Start the fit now; its workers wait (`current`) for the first block."""
        with self._cond:
            if not self._fitting:
                self._prestarted = True
                self._start(spec)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    # ---- rank 0's side
    def command(self, epochs_done: int, last_id: str | None, pid: int) -> BlockCommand | None:
        """The workers reached `epochs_done` (checkpoint `last_id`); wait for a block past it.
        None: leave the loop (the flow's last block is done, the group stops, or it idled out)."""
        with self._cond:
            self._reached, self._last_id = epochs_done, last_id
            self._pids.add(pid)
            self._cond.notify_all()
            deadline = self._clock() + self.idle_timeout_s
            while not self._stopping:
                target = self._target
                if target is not None and target.end_epoch > epochs_done:
                    return target
                if target is not None and target.last:
                    return None  # the flow's last block is done: the group ends with it
                remaining = deadline - self._clock()
                if remaining <= 0:
                    log.info("no block for %.0f s: the worker group ends", self.idle_timeout_s)
                    return None
                self._cond.wait(min(remaining, self._tick_s))
            return None

    def current(self) -> BlockCommand | None:
        """The block in progress, for workers that (re)started inside it."""
        with self._cond:
            return self._target

    def note_pid(self, pid: int, node: str | None = None, pg: str | None = None) -> None:
        with self._cond:
            self._pids.add(pid)
            self._nodes.update([node] if node else [])
            self._pgs.update([pg] if pg else [])

    # ---- the group's end
    def finished(self) -> bool:
        """No fit runs and the group is done (stopped, or the flow's last block reached) or idle
        for longer than the idle timeout (its flow process died): the actor may exit."""
        with self._cond:
            target = self._target
            done = self._stopping or (target is not None and target.last and self._reached >= target.end_epoch)
            return not self._fitting and (done or self._clock() - self._active > self.idle_timeout_s)

    # ---- inside
    def _start(self, spec: BlockSpec) -> None:
        self._error, self._reached, self._fitting = None, 0, True
        threading.Thread(target=self._run, args=(spec,), daemon=True, name="warm-fit").start()

    def _run(self, spec: BlockSpec) -> None:
        error = None
        try:
            self._fit(spec)
        except BaseException as err:  # handed to the block task waiting in take_block, as it is
            error = err
        with self._cond:
            self._error, self._fitting, self._active = error, False, self._clock()
            self._cond.notify_all()
