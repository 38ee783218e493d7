"""``task-phase`` Celery events, published in batches.

:meth:`PhaseEvents.send` only buffers (no I/O). A flush publishes everything buffered as one
``task.multi`` message (Celery's own event batching, which Flower and other event receivers
unpack). It runs on the process's :class:`~buildq.engine.ticker.Ticker` one interval (250 ms) after the
first event buffered since the last flush, at once when 50 are waiting, and when the worker
process stops. Under load one message carries the events of many builds, instead of one
message per build; the price is that an event is seen up to 250 ms after its phase ended.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery

from ..engine.ticker import Ticker

log = logging.getLogger("buildq.events")

#: custom event type sent as each phase ends (``job_id``, ``attempt``, ``phase``, ``seconds``)
PHASE_EVENT = "task-phase"
#: sent when a worker opens (``…-down``) or closes (``…-up``) a daemon's circuit breaker
DAEMON_DOWN_EVENT = "buildq-daemon-down"
DAEMON_UP_EVENT = "buildq-daemon-up"
#: buffered events that make a flush happen at once
BUFFER_LIMIT = 50


class PhaseEvents:
    """This process's buffered phase events (one instance per process and app, made by the
    worker's runtime). Thread-safe."""

    def __init__(self, app: Celery, ticker: Ticker) -> None:
        self.app, self.ticker = app, ticker
        self._lock = threading.Lock()
        self._dispatchers: dict[str, Any] = {}
        self._flush_scheduled = False

    def send(self, hostname: str, **fields: Any) -> None:
        """Buffer one ``task-phase`` event from worker ``hostname``; a flush follows within 250 ms."""
        with self._lock:
            self._dispatcher(hostname).send(PHASE_EVENT, **fields)  # publishes past BUFFER_LIMIT
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self.ticker.every(self._flush_due)

    def send_now(self, hostname: str, event_type: str, **fields: Any) -> None:
        """Publish one event of another type at once (not buffered: daemon up/down)."""
        with self._lock:
            self._dispatcher(hostname).send(event_type, **fields)

    def flush(self) -> None:
        """Publish everything buffered now (errors are logged: events are best effort)."""
        with self._lock:
            self._flush_scheduled = False
            for hostname, dispatcher in list(self._dispatchers.items()):
                try:
                    dispatcher.flush()  # nothing buffered: nothing sent
                except Exception as exc:  # noqa: BLE001 - the broker is away; make a new one next time
                    self._dispatchers.pop(hostname, None)
                    log.warning("phase events not published: %s", exc)

    def _flush_due(self) -> bool:
        self.flush()
        return True  # one flush per schedule: the next buffered event schedules the next one

    def _dispatcher(self, hostname: str) -> Any:
        dispatcher = self._dispatchers.get(hostname)
        if dispatcher is None:
            dispatcher = self.app.events.Dispatcher(
                self.app.connection_for_write(),
                hostname=hostname,
                enabled=True,
                buffer_group=["task"],
                buffer_limit=BUFFER_LIMIT,
            )
            self._dispatchers[hostname] = dispatcher
        return dispatcher
