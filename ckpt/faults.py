"""Fault injection for drills and tests: named points in the checkpoint library where a fault can be
made to happen on purpose, so that product code carries no test-only parameters or branches.

Product code marks a point with `fault_point(NAME)`, a dictionary look-up unless that point is
armed. A point is armed in one of two ways:

- the environment, for drills and for tests that run Baton as a separate process::

      BATON_FAULTS="delete.after_uncommit=kill@100" baton cleanup STORE --keep-last 5

  a comma-separated list of `POINT=ACTION[@N]`: ACTION is `kill` (SIGKILL this process) or
  `raise` (raise `InjectedFault`), fired the N-th time this process reaches POINT (default 1);
- `inject(NAME, action, at=N)` in a test, as a context manager; `action` may also be any callable,
  which runs at the point (to stage a race deterministically, say).

The points (`POINTS`) are part of what drills may rely on; each says where it sits.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Union

from .errors import InjectedFault, InvalidFault

log = logging.getLogger("baton.ckpt")

ENV = "BATON_FAULTS"

POINTS = {
    "delete.after_uncommit": "CheckpointStore.delete, after the manifest is removed and before any file is: "
                             "a kill here leaves a deletion in progress, which the next cleanup finishes",
    "repair.after_uncommit": "CheckpointStore.commit replacing a corrupt checkpoint, after its manifest is "
                             "removed and before its files are rewritten",
}

Action = Union[str, Callable[[], None]]


class _Armed:
    """One armed point: what to do, on which visit, and how many visits so far."""

    def __init__(self, action: Action, at: int):
        self.action, self.at, self.count = action, at, 0


_lock = threading.Lock()
_from_code: dict[str, _Armed] = {}
_from_env: dict[str, _Armed] = {}
_env_seen: str | None = None


def fault_point(name: str) -> None:
    """Mark point `name`; does nothing unless it is armed."""
    armed = _armed(name)
    if armed is None:
        return
    with _lock:
        armed.count += 1
        fire = armed.count == armed.at
    if fire:
        _fire(name, armed)


def check_env() -> None:
    """Read `BATON_FAULTS` now, raising `InvalidFault` if it is malformed: a command calls this
    first, so that a typo fails it before it does anything, not at the point half-way through."""
    _reload_env(os.environ.get(ENV, ""))


def _armed(name: str) -> _Armed | None:
    if name in _from_code:
        return _from_code[name]
    value = os.environ.get(ENV, "")
    if value != _env_seen:
        _reload_env(value)
    return _from_env.get(name)


def _reload_env(value: str) -> None:
    # Re-read whenever the variable changes, and only then: counts survive between visits.
    global _env_seen
    with _lock:
        _from_env.clear()
        _from_env.update(parse(value))
        _env_seen = value


def parse(value: str) -> dict[str, _Armed]:
    """Read a `BATON_FAULTS` value; `InvalidFault` names what is wrong with it."""
    armed = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        point, _, spec = item.partition("=")
        action, _, at = spec.partition("@")
        _check(point, action, at or "1", value)
        armed[point] = _Armed(action, int(at or 1))
    return armed


def _check(point: str, action: str, at: str, value: str) -> None:
    if point not in POINTS:
        raise InvalidFault(f"{ENV}={value!r}: unknown fault point {point!r}; the points are "
                           f"{', '.join(sorted(POINTS))}. Unset {ENV} to run normally.")
    if action not in ("kill", "raise"):
        raise InvalidFault(f"{ENV}={value!r}: action {action!r} of {point} must be 'kill' or 'raise', "
                           "as in delete.after_uncommit=kill@100")
    if not at.isdigit() or int(at) < 1:
        raise InvalidFault(f"{ENV}={value!r}: {point} fires at visit {at!r}; write a number >= 1 after '@'")


def _fire(name: str, armed: _Armed) -> None:
    if callable(armed.action):
        armed.action()
    elif armed.action == "kill":
        log.warning("fault point %s, visit %d: killing this process (fault injection, %s)", name, armed.at, ENV)
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        raise InjectedFault(f"fault injected at {name} (visit {armed.at}); unset {ENV} to run normally")


@contextmanager
def inject(name: str, action: Action = "raise", at: int = 1) -> Iterator[None]:
    """Arm point `name` inside the block: `action` fires on its `at`-th visit."""
    if name not in POINTS:
        raise InvalidFault(f"unknown fault point {name!r}; the points are {', '.join(sorted(POINTS))}")
    _from_code[name] = _Armed(action, at)
    try:
        yield
    finally:
        _from_code.pop(name, None)
