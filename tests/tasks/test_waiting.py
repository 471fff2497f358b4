"""The one wait/poll helper (tasks/runtime/waiting.py): `wait_for` on an injected clock, so no test
sleeps, and `Poller` on a real thread with short intervals."""

from __future__ import annotations

import logging
import threading

import pytest

from tasks.runtime.waiting import Poller, wait_for


class FakeTime:
    """A monotonic clock that moves only when something sleeps on it."""

    def __init__(self):
        self.now, self.sleeps = 100.0, []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_wait_for_returns_the_first_truthy_value_and_fetches_no_more():
    time, answers = FakeTime(), iter([None, 0, "", "ready", "never fetched"])
    assert wait_for(lambda: next(answers), timeout_s=10, interval_s=0.5, clock=time.clock, sleep=time.sleep) == "ready"
    assert time.sleeps == [0.5, 0.5, 0.5]
    assert next(answers) == "never fetched"


def test_wait_for_gives_up_at_the_deadline_after_one_last_fetch_and_never_sleeps_past_it():
    time, fetched = FakeTime(), []

    def fetch():
        fetched.append(time.now)
        return None

    assert wait_for(fetch, timeout_s=1.0, interval_s=0.4, clock=time.clock, sleep=time.sleep) is None
    assert time.sleeps == pytest.approx([0.4, 0.4, 0.2])
    assert fetched == pytest.approx([100.0, 100.4, 100.8, 101.0])  # the last one at the deadline


def test_wait_for_fetches_once_even_with_no_time_to_wait():
    time, calls = FakeTime(), []
    assert wait_for(lambda: calls.append(1), timeout_s=0, clock=time.clock, sleep=time.sleep) is None
    assert calls == [1] and time.sleeps == []


def test_wait_for_lets_an_error_of_the_fetch_through():
    time = FakeTime()

    def fetch():
        raise LookupError("the thing waited for cannot come")

    with pytest.raises(LookupError, match="cannot come"):
        wait_for(fetch, timeout_s=5, clock=time.clock, sleep=time.sleep)


def test_a_poller_that_polls_true_stops_by_itself():
    calls = []
    poller = Poller(lambda: len(calls) >= 3 or calls.append(1), 0.01, "test-stops").start()
    poller._thread.join(5)
    assert not poller._thread.is_alive() and len(calls) == 3


def test_a_poller_logs_and_keeps_a_failed_poll_and_polls_again(caplog):
    calls, done = [], threading.Event()

    def poll():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("the store blinked")
        done.set()
        return True

    logger = logging.getLogger("test.poller")
    with caplog.at_level(logging.WARNING, logger="test.poller"):
        poller = Poller(poll, 0.01, "test-retries", logger=logger).start()
        assert done.wait(5)
        poller.close(join_s=5)
    assert len(calls) == 2 and isinstance(poller.error, OSError)
    assert "test-retries: OSError: the store blinked" in caplog.text


def test_a_poller_without_first_wait_polls_at_once_and_stops_when_closed():
    polled = threading.Event()
    poller = Poller(polled.set, 3600, "test-first", first_wait=False).start()
    assert polled.wait(5)  # long before the first interval
    poller.close(join_s=5)
    assert poller.stopped and not poller._thread.is_alive()
