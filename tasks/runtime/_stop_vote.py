"""Preemption as a TrainContext sees it (the notices themselves: tasks/runtime/stop.py): the vote
that makes every rank stop at the same step, committing that step, and the `Preempted` that ends
the block saying where a rerun resumes.

`PreemptionMixin` is one half of `tasks.context.TrainContext` and works on its attributes (`_notice`,
`_drain`, `_notice_vote`, `_stop_after_epoch`, `_step_s`, `_committed_step`, `_dist`...)."""

from __future__ import annotations

import logging
import time
from typing import Any

from .errors import Preempted

log = logging.getLogger("baton.worker")


class PreemptionMixin:
    """The preemption side of `TrainContext`: its watchers, the vote, and stopping at a step."""

    def _vote_on_notice(self) -> None:
        """Preemption: every rank learns of a notice through one collective that runs during the
        next step (no stall per step); all ranks read its answer at the same step and stop there."""
        noticed = bool(self._notice and self._notice.requested) or bool(self._drain and self._drain.requested)
        agreed, self._notice_vote = self._notice_vote, self._dist.start_any(noticed)
        if agreed is not None and self._dist.finish_any(agreed):
            self._drain_vote()
            self._stop_at_step()

    def _stop_at_step(self) -> None:
        """A preemption notice: commit this exact step (all ranks are here), then end the block."""
        started = time.perf_counter()
        if self._mid_epoch_checkpoint_possible():
            if self._committed_step != self._position.step:
                self._checkpoint(report=False)
            self._preempted(started)
        if self._loaders:  # the loader's last batch: the epoch-end commit follows at once
            self._stop_after_epoch = True
            return
        last = self._dist.broadcast_object(self._committer.parent if self._committer else None)
        raise Preempted(self._position.epoch, self._position.step, last, where="no checkpoint of the step")

    def _preempted(self, started: float) -> None:
        self._settle()
        saved_s = time.perf_counter() - started
        checkpoint = self._dist.broadcast_object(self._committer.parent if self._committer else None)
        where = "end of epoch" if self._position.epoch_complete else "step"
        drain = self._drain if self._drain and self._drain.requested else None
        stopped = Preempted(self._position.epoch, self._position.step, checkpoint, where=where,
                            reason=drain.reason if drain else "", drain=drain is not None)
        if self.rank == 0:
            reason = self._notice.reason if self._notice else "notice"
            log.warning("%s (%s). Stopping took %.2f s after the step (a step takes %.2f s, the save %.2f s): a "
                        "notice shorter than a step plus a save falls back to the last committed checkpoint",
                        stopped, reason, saved_s + self._step_s, self._step_s, saved_s)
        if drain is not None:
            if drain.deadline is not None and drain.deadline - drain.seen_at < self._step_s + saved_s:
                log.warning("the drain of this rank's node gave %.1f s of notice, less than a step plus a save "
                            "(%.2f s + %.2f s): had the node gone at its deadline, the run would have resumed at the "
                            "last committed checkpoint; a smaller checkpoint_every_steps loses less then",
                            drain.deadline - drain.seen_at, self._step_s, saved_s)
        raise stopped

    def _drain_vote(self) -> None:
        """Finish the vote in flight (every rank has one, from the same step)."""
        vote, self._notice_vote = self._notice_vote, None
        if vote is not None:
            self._dist.finish_any(vote)

    def _close_watchers(self) -> None:
        for watcher in (self._notice, self._drain):
            if watcher is not None:
                watcher.close()


def _drain_watch(ctx: Any):
    """A DrainWatch of this rank's node; None (logged) where Ray cannot say (no drain is then seen)."""
    from .stop import DrainWatch

    try:
        return DrainWatch(ctx.store, ctx.spec.lineage, ctx.spec.fence, ctx.rank)
    except Exception as err:
        log.warning("rank %d cannot watch its Ray node for a drain (%s): a drain stops nothing early", ctx.rank, err)
        return None
