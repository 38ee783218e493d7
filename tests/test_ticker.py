"""The per-process Ticker that runs build watchers, and the SideChannel's drain."""

from __future__ import annotations

import threading
import time

import pytest

from buildq.engine.sidechannel import SideChannel
from buildq.engine.ticker import Ticker


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_each_ticket_ticks_on_its_own_schedule_until_it_says_stop() -> None:
    ticker = Ticker(0.02)
    calls: list[str] = []
    ticker.every(lambda: calls.append("a") or calls.count("a") == 3)
    wait_for(lambda: calls.count("a") == 3)
    b = ticker.every(lambda: calls.append("b") or False)
    wait_for(lambda: calls.count("b") >= 2)
    assert calls.count("a") == 3  # stopped after returning True
    assert len(ticker) == 1
    b.cancel()
    assert len(ticker) == 0


def test_no_tick_before_one_interval() -> None:
    ticker = Ticker(30.0)
    calls: list[int] = []
    ticket = ticker.every(lambda: calls.append(1) or False)
    time.sleep(0.05)
    ticket.cancel()
    assert calls == []


def test_cancel_waits_for_a_running_tick_and_no_tick_follows() -> None:
    ticker = Ticker(0.01)
    inside, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def slow() -> bool:
        calls.append(1)
        inside.set()
        release.wait(5)
        return False

    ticket = ticker.every(slow)
    assert inside.wait(5)
    cancelled = threading.Event()
    canceller = threading.Thread(target=lambda: (ticket.cancel(), cancelled.set()))
    canceller.start()
    assert not cancelled.wait(0.05)  # still inside the tick
    release.set()
    canceller.join(5)
    count = len(calls)
    time.sleep(0.05)
    assert len(calls) == count == 1


def test_a_failing_callback_does_not_stop_the_others() -> None:
    ticker = Ticker(0.01)
    calls: list[str] = []

    def broken() -> bool:
        calls.append("broken")
        raise RuntimeError("boom")

    first = ticker.every(broken)
    ticker.every(lambda: calls.append("ok") or calls.count("ok") >= 3)
    wait_for(lambda: calls.count("ok") >= 3 and calls.count("broken") >= 2)
    first.cancel()


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        Ticker(0)


def test_idle_side_channel_drain_returns_without_starting_a_thread() -> None:
    before = {t.name for t in threading.enumerate()}
    side = SideChannel(name="idle-side")
    assert side.drain()
    assert {t.name for t in threading.enumerate()} - before == set()


def test_drain_waits_for_everything_submitted_before_it() -> None:
    side = SideChannel()
    order: list[str] = []
    gate = threading.Event()
    side.submit(lambda: gate.wait(5) and order.append("slow"))
    side.submit(order.append, "next")
    threading.Timer(0.05, gate.set).start()
    assert side.drain()
    assert order == ["slow", "next"]
    assert side.drain()  # idle again


def test_a_failing_side_job_is_counted_and_the_next_one_runs() -> None:
    side = SideChannel()
    done: list[int] = []
    side.submit(lambda: 1 / 0)
    side.submit(done.append, 1)
    assert side.drain()
    assert side.failures == 1 and done == [1]


def test_the_ticker_thread_survives_a_failing_clock() -> None:
    calls: list[int] = []
    failures = iter([True, True])

    def clock() -> float:  # fails on the ticker thread's first two reads
        if threading.current_thread().name == "buildq-ticker" and next(failures, False):
            raise OSError("clock went away")
        return time.monotonic()

    ticker = Ticker(0.01, clock=clock)
    ticker.every(lambda: calls.append(1) or len(calls) == 2)
    wait_for(lambda: len(calls) == 2)
    assert next(failures, None) is None  # both failures happened
