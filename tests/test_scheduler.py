"""The per-process Scheduler: timed and periodic calls, the ordered ``soon`` calls and their drain,
the idle wait on the process's cancel subscription (formerly the Ticker and the SideChannel)."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import pytest

from buildq.engine.scheduler import Scheduler


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


@pytest.fixture
def scheduler() -> Any:
    made: list[Scheduler] = []

    def make(**kw: Any) -> Scheduler:
        made.append(Scheduler(**kw))
        return made[-1]

    yield make
    for s in made:
        s.stop()


def test_each_call_runs_on_its_own_schedule_until_it_says_stop(scheduler) -> None:
    s = scheduler()
    calls: list[str] = []
    s.every(0.02, lambda: calls.append("a") or calls.count("a") == 3)
    wait_for(lambda: calls.count("a") == 3)
    b = s.every(0.02, lambda: calls.append("b") or False)
    wait_for(lambda: calls.count("b") >= 2)
    assert calls.count("a") == 3  # stopped after returning True
    assert s.pending() == 1
    b.cancel()
    assert s.pending() == 0


def test_no_call_before_one_interval_unless_asked(scheduler) -> None:
    s = scheduler()
    calls: list[str] = []
    handle = s.every(30.0, lambda: calls.append("late") or False)
    s.every(30.0, lambda: calls.append("first") or True, first_in=0.0)
    wait_for(lambda: calls == ["first"])
    time.sleep(0.05)
    handle.cancel()
    assert calls == ["first"]


def test_a_later_call_runs_once_after_its_delay_and_can_be_cancelled(scheduler) -> None:
    s = scheduler()
    calls: list[float] = []
    start = time.monotonic()
    s.later(0.05, lambda: calls.append(time.monotonic() - start))
    dropped = s.later(0.05, lambda: calls.append(-1.0))
    s.cancel([dropped])
    wait_for(lambda: calls)
    time.sleep(0.1)
    assert len(calls) == 1 and calls[0] >= 0.05
    assert s.pending() == 0


def test_an_earlier_call_added_later_is_not_kept_waiting(scheduler) -> None:
    """A call due sooner than everything queued wakes the thread at once."""
    s = scheduler()
    s.every(60.0, lambda: False)  # the thread now sleeps for a minute
    time.sleep(0.02)
    done = threading.Event()
    start = time.monotonic()
    s.later(0.01, done.set)
    assert done.wait(2)
    assert time.monotonic() - start < 0.5


def test_cancel_waits_for_a_running_call_and_no_call_follows(scheduler) -> None:
    s = scheduler()
    inside, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def slow() -> bool:
        calls.append(1)
        inside.set()
        release.wait(5)
        return False

    handle = s.every(0.01, slow)
    assert inside.wait(5)
    cancelled = threading.Event()
    canceller = threading.Thread(target=lambda: (handle.cancel(), cancelled.set()))
    canceller.start()
    assert not cancelled.wait(0.05)  # still inside the call
    release.set()
    canceller.join(5)
    count = len(calls)
    time.sleep(0.05)
    assert len(calls) == count == 1


def test_a_failing_call_does_not_stop_the_others(scheduler) -> None:
    s = scheduler()
    calls: list[str] = []

    def broken() -> bool:
        calls.append("broken")
        raise RuntimeError("boom")

    first = s.every(0.01, broken)
    s.every(0.01, lambda: calls.append("ok") or calls.count("ok") >= 3)
    wait_for(lambda: calls.count("ok") >= 3 and calls.count("broken") >= 2)
    first.cancel()


def test_interval_must_be_positive(scheduler) -> None:
    s = scheduler()
    with pytest.raises(ValueError, match="interval_s"):
        s.every(0, lambda: None)


def test_idle_drain_returns_without_starting_a_thread(scheduler) -> None:
    before = {t.name for t in threading.enumerate()}
    s = scheduler(name="idle-scheduler")
    assert s.drain()
    assert {t.name for t in threading.enumerate()} - before == set()


def test_drain_waits_for_every_soon_call_made_before_it_in_order(scheduler) -> None:
    s = scheduler()
    order: list[str] = []
    gate = threading.Event()
    s.soon(lambda: gate.wait(5) and order.append("slow"))
    s.soon(order.append, "next")
    threading.Timer(0.05, gate.set).start()
    assert s.drain()
    assert order == ["slow", "next"]
    assert s.drain()  # idle again


def test_drain_gives_up_after_its_timeout(scheduler) -> None:
    s = scheduler()
    gate = threading.Event()
    s.soon(gate.wait, 5)
    assert not s.drain(0.05)
    gate.set()
    assert s.drain()


def test_a_failing_soon_call_is_drained_and_the_next_one_runs(scheduler) -> None:
    s = scheduler()
    done: list[int] = []
    s.soon(lambda: 1 / 0)
    s.soon(done.append, 1)
    assert s.drain()
    assert done == [1]


def test_the_thread_survives_a_failing_clock(scheduler) -> None:
    calls: list[int] = []
    failures = iter([True, True])

    def clock() -> float:  # fails on the scheduler thread's first two reads
        if threading.current_thread().name == "buildq-scheduler" and next(failures, False):
            raise OSError("clock went away")
        return time.monotonic()

    s = scheduler(clock=clock)
    s.every(0.01, lambda: calls.append(1) or len(calls) == 2)
    wait_for(lambda: len(calls) == 2)
    assert next(failures, None) is None  # both failures happened


def test_while_idle_it_waits_on_the_listeners_socket_and_acts_at_once(scheduler) -> None:
    """The cancel subscription: an event on the listener's socket is handled the moment it
    arrives, not at the next timed call."""
    s = scheduler()
    ours, theirs = socket.socketpair()
    got: list[tuple[bytes, float]] = []

    def listener(timeout: float) -> Any:
        assert timeout == 0.0
        try:
            data = ours.recv(100)
            got.append((data, time.monotonic()))
        except BlockingIOError:
            pass
        return ours

    ours.setblocking(False)
    try:
        s.every(60.0, lambda: False)  # started, idle for a minute
        s.listen(listener)
        time.sleep(0.05)
        sent = time.monotonic()
        theirs.send(b"cancel job-1")
        wait_for(lambda: got, timeout=2)
        assert got[0][0] == b"cancel job-1" and got[0][1] - sent < 0.5
    finally:
        s.listen(None)
        ours.close()
        theirs.close()


def test_a_failing_listener_does_not_stop_the_timed_calls(scheduler) -> None:
    s = scheduler()
    calls: list[int] = []

    def broken(timeout: float) -> Any:
        raise ConnectionError("redis away")

    s.listen(broken)
    s.every(0.02, lambda: calls.append(1) or len(calls) == 3)
    wait_for(lambda: len(calls) == 3)


def test_stop_ends_the_thread(scheduler) -> None:
    s = scheduler(name="stopping-scheduler")
    calls: list[int] = []
    s.every(0.01, lambda: calls.append(1) or False)
    wait_for(lambda: calls)
    s.stop()
    wait_for(lambda: "stopping-scheduler" not in {t.name for t in threading.enumerate()})
    count = len(calls)
    time.sleep(0.05)
    assert len(calls) == count


def test_a_forked_child_needs_a_scheduler_of_its_own() -> None:
    s = Scheduler()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            s.later(0.01, lambda: None)
            code = b"no error"
        except RuntimeError as exc:
            code = str(exc).encode()
        os.write(write, code)
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    answer = os.read(read, 1000).decode()
    os.close(read)
    assert "after a fork" in answer
    s.stop()


def test_a_cancelled_call_keeps_nothing_alive_and_the_queue_stays_as_long_as_what_is_live(scheduler) -> None:
    """A pool process cancels every build's deadline (hours away) when the build ends: what the
    call would have touched is freed at once, and cancelled calls do not pile up in the queue."""
    import gc
    import weakref

    class Build:
        def stop(self) -> None: ...

    s = scheduler()
    keep = s.every(3600, lambda: None)  # a live call is never dropped
    gone = []
    for _ in range(500):
        build = Build()
        gone.append(weakref.ref(build))
        s.later(3600, build.stop).cancel()
        del build
    gc.collect()
    assert all(ref() is None for ref in gone)  # no build is kept alive by its cancelled deadline
    assert len(s._heap) < 100  # private, on purpose: the promise is about the queue's size
    assert s.pending() == 1 and not keep.cancelled
