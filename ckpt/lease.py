"""One writer per lineage: a lease object in the store, with a fencing number.

Each take-over claims the next fencing number by an exclusive create (O_EXCL on disk,
If-None-Match on S3), so two contenders can never both win. Commits check that the lease still
carries their fencing number: a writer whose lease was taken over can no longer commit, which
matters because Ray Train workers outlive a SIGKILLed driver by seconds.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Callable

from pydantic import BaseModel, Field, ValidationError

from . import _io
from .errors import LeaseHeld, LeaseLost, LeaseUnreadable
from .manifest import utcnow

log = logging.getLogger("baton.ckpt")
_CLAIM = re.compile(r"claim-([0-9]{12})")  # fullmatch on the file name: `$` would allow a trailing newline


class LeaseRecord(BaseModel):
    owner: str = Field(description="Who holds the lease (free text, shown to contenders).")
    host: str
    pid: int
    fence: int = Field(ge=1, description="Grows by one with every take-over.")
    heartbeat_at: datetime
    ttl_s: float = Field(gt=0)

    def expires_at(self) -> datetime:
        return self.heartbeat_at + timedelta(seconds=self.ttl_s)

    def holder_alive(self, now: datetime | None = None) -> bool:
        if (now or utcnow()) >= self.expires_at():
            return False
        if self.host == socket.gethostname():
            return _pid_alive(self.pid)
        return True

    def describe(self) -> str:
        return (f"{self.owner} (pid {self.pid} on {self.host}, fence {self.fence}, "
                f"last heartbeat {self.heartbeat_at.isoformat(timespec='seconds')}, ttl {self.ttl_s:g} s)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """The single-writer lease of one lineage. Use as a context manager around a run.

    Time comes in as arguments, so tests of expiry and heartbeats need not sleep: `clock` gives
    the wall-clock time in seconds (heartbeats and expiry are compared across machines, so it is
    wall time, not monotonic), and `wait(stop, seconds)` is how the heartbeat thread waits
    between beats (True: the lease is being released)."""

    def __init__(self, store, lineage: str, owner: str | None = None, ttl_s: float = 30.0, *,
                 clock: Callable[[], float] = time.time,
                 wait: Callable[[threading.Event, float], bool] = threading.Event.wait):
        self.store = store
        self.lineage = lineage
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.ttl_s = ttl_s
        self._clock, self._wait = clock, wait
        self.fence: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: LeaseLost | None = None

    @property
    def _folder(self) -> str:
        return self.store.path(self.lineage, "_lease")

    @staticmethod
    def current(store, lineage: str) -> LeaseRecord | None:
        path = store.path(lineage, "_lease", "current.json")
        try:
            raw = _io.read_bytes(store.fs, path)
        except FileNotFoundError:
            return None
        try:
            return LeaseRecord.model_validate_json(raw)
        except ValidationError as err:  # garbage, or a record of another shape: say which file
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in err.errors())
            raise LeaseUnreadable(path, problems) from err

    @staticmethod
    def check(store, lineage: str, fence: int) -> None:
        """Raise `LeaseLost` unless the lineage's lease still carries `fence`."""
        current = Lease.current(store, lineage)
        if current is None or current.fence != fence:
            holder = current.describe() if current else "nobody (released)"
            raise LeaseLost(
                f"refusing to commit to lineage {lineage!r}: this writer's lease (fence {fence}) "
                f"was taken over; it is now held by {holder}. The newer run owns the lineage."
            )

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), timezone.utc)

    def _record(self) -> LeaseRecord:
        return LeaseRecord(owner=self.owner, host=socket.gethostname(), pid=os.getpid(),
                           fence=self.fence, heartbeat_at=self._now(), ttl_s=self.ttl_s)

    def _write(self) -> None:
        _io.write_atomic(self.store.fs, f"{self._folder}/current.json", self._record().model_dump_json().encode())

    def acquire(self) -> int:
        # Claims are listed before the record is read: a claim made after the listing competes
        # with ours for the same number, and the highest claim seen is either the one in the
        # record, released, or still being taken (which counts as held until its holder dies).
        highest = self._highest_claim()
        current = Lease.current(self.store, self.lineage)
        if current is not None and current.holder_alive(self._now()) and current.owner != self.owner:
            raise LeaseHeld(
                f"lineage {self.lineage!r} is being trained by {current.describe()}. "
                "Wait for that run to finish, stop it, or train another lineage with --lineage; "
                f"a dead holder's lease is taken over after its ttl ({current.ttl_s:g} s)."
            )
        if highest > (current.fence if current else 0) and not self._claim_settled(highest):
            raise LeaseHeld(f"another writer claimed lineage {self.lineage!r} at this moment (fence {highest}); try again")
        fence = max(current.fence if current else 0, highest) + 1
        self.fence = fence
        if not _io.write_exclusive(self.store.fs, f"{self._folder}/claim-{fence:012d}",
                                   self._record().model_dump_json().encode()):
            self.fence = None
            raise LeaseHeld(f"another writer claimed lineage {self.lineage!r} at this moment (fence {fence}); try again")
        self._write()
        if current is not None and current.owner != self.owner:
            log.warning("took over the lease of lineage %s from %s", self.lineage, current.describe())
        return fence

    def _claim_settled(self, fence: int) -> bool:
        """True when claim `fence` (with no record yet) was released, or its claimant is dead."""
        if self.store.fs.exists(f"{self._folder}/released-{fence:012d}"):
            return True
        try:
            claim = LeaseRecord.model_validate_json(_io.read_bytes(self.store.fs, f"{self._folder}/claim-{fence:012d}"))
        except ValueError:  # a claim written before claims carried a record: its holder recorded it or left
            return True
        return not claim.holder_alive(self._now())

    def _highest_claim(self) -> int:
        if not self.store.fs.exists(self._folder):
            return 0
        numbers = [int(m.group(1)) for p in self.store.fs.ls(self._folder, detail=False)
                   if (m := _CLAIM.fullmatch(p.rstrip("/").rsplit("/", 1)[-1]))]
        return max(numbers, default=0)

    def heartbeat(self) -> None:
        Lease.check(self.store, self.lineage, self.fence)
        self._write()

    def _beat(self) -> None:
        while not self._wait(self._stop, self.ttl_s / 3):
            try:
                self.heartbeat()
            except LeaseLost as err:
                self.lost = err
                log.error("%s", err)
                return
            except Exception as err:  # a transient storage error: keep trying until the ttl runs out
                log.warning("lease heartbeat for %s failed: %s", self.lineage, err)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.fence is None:
            return
        current = Lease.current(self.store, self.lineage)
        if current is not None and current.fence == self.fence:
            # Marked released before the record goes, so the next writer need not wait for a ttl.
            _io.write_atomic(self.store.fs, f"{self._folder}/released-{self.fence:012d}", b"{}")
            self.store.fs.rm_file(f"{self._folder}/current.json")
        self.fence = None

    def __enter__(self) -> "Lease":
        self.acquire()
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.lineage}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
