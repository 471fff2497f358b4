"""The warm worker group's protocol, typed, and the workers' side of it.

The group itself (`tasks.warm.WarmGroup`, a detached Ray actor wrapping the protocol's state
machine, `tasks.group_schedule.GroupSchedule`) and the block tasks that drive it live in `tasks`;
the workers reach it by name only, through the two calls here, so the worker runtime never imports
the block side:

    block task --BlockCommand--> WarmGroup --BlockCommand--> rank 0 (fetch_command, at a block's end)
               <--BlockResult---           <--reached E------
    a worker (re)starting inside the group: join_group -> the block in progress
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .spec import BlockSpec

NAMESPACE = "baton"  # the Ray namespace of every warm group actor


class GroupKey(BaseModel):
    """What a group must share with a block to train it: the same training, under the same lease.
    `fence` is None in a group started before its flow run held the lease (prestarted)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lineage: str
    fence: int | None
    config_hash: str
    settings: dict[str, Any]
    import_paths: list[str]

    @classmethod
    def of(cls, spec: BlockSpec, fence: int | None = -1) -> "GroupKey":
        return cls(lineage=spec.lineage, fence=spec.fence if fence == -1 else fence, config_hash=spec.config_hash,
                   settings=spec.settings.model_dump(mode="json"), import_paths=list(spec.import_paths))

    def serves(self, spec: BlockSpec) -> bool:
        """Whether a group of this key may train block `spec`: the same training under the same
        lease. A prestarted group (no fence yet) takes the fence of its first block."""
        key = self if self.fence is not None else self.model_copy(update={"fence": spec.fence})
        return key == GroupKey.of(spec)


class BlockCommand(BaseModel):
    """Bring the lineage to the end of epoch `end_epoch - 1`, starting from checkpoint `start_id`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0)
    end_epoch: int = Field(ge=1)
    fence: int = Field(ge=0)
    last: bool
    start_id: str | None = None
    # Set on rank 0's side: the state the workers hold is not `start_id` (someone else trained the
    # lineage since the group committed last), so they load it from the store.
    reload: bool = False

    @classmethod
    def of(cls, spec: BlockSpec, start_id: str | None) -> "BlockCommand":
        return cls(index=spec.index, end_epoch=spec.end_epoch, fence=spec.fence, last=spec.last, start_id=start_id)

    def for_workers_at(self, last_id: str | None) -> "BlockCommand":
        """This command as rank 0 takes it, its workers holding checkpoint `last_id` (the one they
        committed last): they reload from the store when the block starts from another one."""
        return self.model_copy(update={"reload": self.start_id is not None and self.start_id != last_id})

    def applied_to(self, spec: BlockSpec) -> BlockSpec:
        """The block `spec` becomes when the group takes this command."""
        return spec.model_copy(update={"index": self.index, "end_epoch": self.end_epoch, "fence": self.fence,
                                       "last": self.last})


class BlockResult(BaseModel):
    """What the group answers a block task once the block's end epoch is committed."""

    fresh: bool = Field(description="The group's first block (its workers started for it, or prestarted).")
    prestarted: bool = Field(description="Trained on the group started with the run, before the flow began.")
    pids: list[int]
    checkpoint: str | None


class GroupState(BaseModel):
    """The group as the block task sees it: its key, and where its actor and workers run."""

    key: GroupKey
    running: bool
    error: str | None
    pid: int
    node: str
    nodes: list[str]
    pgs: list[str]


def _group(name: str):
    import ray

    return ray.get_actor(name, namespace=NAMESPACE)


def join_group(spec: BlockSpec, poll_s: float = 0.2) -> BlockSpec | None:
    """A worker (re)starting inside a warm group: note its process, node and placement group, take
    the block in progress (after a worker-group restart that may be a later block than the one the
    fit began with). In a prestarted group, wait for the first block; None: it never came."""
    import ray

    from .waiting import wait_for

    group = _group(spec.warm_group)
    pg = ray.util.get_current_placement_group()
    ray.get(group.note_pid.remote(os.getpid(), ray.get_runtime_context().get_node_id(), pg.id.hex() if pg else None))
    # A prestarted group's workers poll for the first block rather than each holding one of the
    # actor's few concurrent calls while they wait (with many workers the block could not get in).
    current = wait_for(lambda: ray.get(group.current.remote()), timeout_s=spec.settings.warm_idle_timeout_s,
                       interval_s=poll_s)
    return None if current is None else current.applied_to(spec)


def fetch_command(name: str, epochs_done: int, last_id: str | None) -> BlockCommand | None:
    """Rank 0, at the end of a block: the next block's command, or None when the group ends."""
    import ray

    command = ray.get(_group(name).command.remote(epochs_done, last_id, os.getpid()))
    return None if command is None else command.for_workers_at(last_id)
