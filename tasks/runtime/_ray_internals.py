"""Every use of a private Ray API, in one place, each guarded: `check()` (run by a fast test
against the pinned Ray) fails loudly when an upgrade moved one, instead of a swallowed error at
run time. Nothing else in Baton reaches into `ray._private`, Ray's GCS protobufs or Ray Train's
actor class names.

- `draining_nodes`: the GCS's table of draining nodes (node id -> deadline in ms), which Ray
  Train's own PreemptionWatcher and Ray Data read; the public `ray.train.get_preemption_info()`
  is a barrier of all ranks fed every 5 s.
- `actors`, `placement_groups`: the GCS's actor and placement-group tables, which answer without
  a dashboard (the state API needs one); the clean-up of a lost warm group reads them.
- `TRAIN_CONTROLLER`, `PLACEMENT_GROUP_CLEANER`: the class names of Ray Train V2's controller
  actor and of the detached actor that removes its placement group.
"""

from __future__ import annotations

from dataclasses import dataclass

TRAIN_CONTROLLER = "TrainController"
PLACEMENT_GROUP_CLEANER = "PlacementGroupCleaner"


@dataclass(frozen=True)
class ActorRecord:
    name: str
    class_name: str
    actor_id: bytes
    worker_id: bytes  # of the process the actor runs in
    owner_worker_id: bytes  # of the process that created it
    alive: bool
    node_id: str  # hex
    pid: int


@dataclass(frozen=True)
class PlacementGroupRecord:
    id: bytes
    creator_actor_id: bytes
    removed: bool


def _state():
    import ray._private.state

    return ray._private.state.state


def draining_nodes() -> dict[str, int]:
    """Node id (hex) -> drain deadline (ms since the epoch, 0: none), for every draining node."""
    return dict(_state().get_draining_nodes() or {})


def actors() -> list[ActorRecord]:
    from ray.core.generated import gcs_pb2

    table = gcs_pb2.ActorTableData
    out = []
    for raw in _state()._connect_and_get_accessor().get_actor_table(None, None):
        a = table.FromString(raw)
        out.append(ActorRecord(name=a.name, class_name=a.class_name, actor_id=a.actor_id,
                               worker_id=a.address.worker_id, owner_worker_id=a.owner_address.worker_id,
                               alive=a.state == table.ALIVE, node_id=a.address.node_id.hex(), pid=a.pid))
    return out


def placement_groups() -> list[PlacementGroupRecord]:
    from ray.core.generated import gcs_pb2

    table = gcs_pb2.PlacementGroupTableData
    out = []
    for raw in _state()._connect_and_get_accessor().get_placement_group_table():
        p = table.FromString(raw)
        out.append(PlacementGroupRecord(id=p.placement_group_id, creator_actor_id=p.creator_actor_id,
                                        removed=p.state == table.REMOVED))
    return out


def check() -> list[str]:
    """What of the above the installed Ray no longer has (empty: all there). Needs no cluster."""
    problems = []
    try:
        import ray._private.state as state_module
        from ray.core.generated import gcs_pb2
    except ImportError as err:
        return [f"cannot import Ray's private state or GCS protobufs: {err}"]
    state_class = type(state_module.state)
    for name in ("get_draining_nodes", "_connect_and_get_accessor"):
        if not hasattr(state_class, name):
            problems.append(f"ray._private.state.GlobalState.{name} is gone")
    for message, fields in ((gcs_pb2.ActorTableData, ("name", "class_name", "actor_id", "address", "owner_address",
                                                     "state", "pid")),
                            (gcs_pb2.PlacementGroupTableData, ("placement_group_id", "creator_actor_id", "state"))):
        known = set(message.DESCRIPTOR.fields_by_name)
        problems += [f"{message.__name__}.{f} is gone" for f in fields if f not in known]
    if not hasattr(gcs_pb2.ActorTableData, "ALIVE") or not hasattr(gcs_pb2.PlacementGroupTableData, "REMOVED"):
        problems.append("the ALIVE / REMOVED states of Ray's GCS tables are gone")
    try:
        from ray.train.v2._internal.execution.controller import TrainController  # noqa: F401
    except ImportError as err:
        problems.append(f"Ray Train's {TRAIN_CONTROLLER} moved: {err}")
    try:
        from ray.train.v2._internal.execution.controller.placement_group_cleaner import (  # noqa: F401
            PlacementGroupCleaner,
        )
    except ImportError as err:
        problems.append(f"Ray Train's {PLACEMENT_GROUP_CLEANER} moved: {err}")
    return problems
