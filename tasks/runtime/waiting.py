"""Waiting and polling, written once: `wait_for` (a value, or give up after a timeout) and
`Poller` (a function called every few seconds on a daemon thread until closed).

Time comes in as arguments (`clock`, `sleep`), so tests of what waits need not sleep."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(fetch: Callable[[], T], *, timeout_s: float, interval_s: float = 0.2,
             clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> T | None:
    """`fetch()` until it returns something truthy (returned), at most `timeout_s`; then None.
    `fetch` runs at least once, and once more at the deadline."""
    deadline = clock() + timeout_s
    while True:
        value = fetch()
        if value:
            return value
        left = deadline - clock()
        if left <= 0:
            return None
        sleep(min(interval_s, left))


class Poller:
    """Calls `poll()` every `interval_s` seconds on a daemon thread until `close()` or until
    `poll()` returns True. An exception in `poll` is logged on `logger` at `level` and the next
    poll retries (a storage or network hiccup must not stop what the poller serves); the last one
    is kept in `error`."""

    def __init__(self, poll: Callable[[], bool | None], interval_s: float, name: str, *,
                 logger: logging.Logger | None = None, level: int = logging.WARNING, first_wait: bool = True):
        self.poll, self.interval_s, self.logger, self.level = poll, interval_s, logger, level
        self.error: BaseException | None = None
        self._first_wait = first_wait
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=name)

    def start(self) -> "Poller":
        self._thread.start()
        return self

    def _loop(self) -> None:
        if not self._first_wait and self._once():
            return
        while not self._stop.wait(self.interval_s):
            if self._once():
                return

    def _once(self) -> bool:
        try:
            return bool(self.poll())
        except Exception as err:  # noqa: BLE001 - kept, logged, and retried at the next poll
            self.error = err
            if self.logger is not None:
                self.logger.log(self.level, "%s: %s: %s", self._thread.name, type(err).__name__, err)
            return False

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def close(self, join_s: float | None = None) -> None:
        self._stop.set()
        if join_s is not None and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(join_s)
