"""The Celery application, made from the settings by :func:`create_app` (nothing at import time).

The worker registers the ``buildq.build`` task on it (:func:`buildq.celeryapp.worker.create_worker_app`).
For Celery's own command line, ``celery -A buildq.celeryapp.app inspect active`` (or ``control
pool_grow 1``, ``shutdown``, …) finds ``app`` here: the module makes it from the ``BUILDQ_*``
settings on first access (the broker, Sentinel transport options included), and only then.
"""

from __future__ import annotations

from celery import Celery

from ..config import Settings


def celery_config(settings: Settings) -> dict[str, object]:
    """Celery settings that make builds neither lost nor doubled (see docs/reliability.md)."""
    # hard limit: the job's own watcher kills buildctl first; this is the backstop
    hard_limit = settings.max_timeout_s + 120
    transport: dict[str, object] = {"visibility_timeout": settings.visibility_timeout_s}
    if settings.sentinel_master:  # sentinel:// URLs: kombu and the result backend follow the master
        transport["master_name"] = settings.sentinel_master
        if settings.sentinel_password is not None:
            transport["sentinel_kwargs"] = {"password": settings.sentinel_password.get_secret_value()}
    # a worker consuming "builds.high,builds" drains the high-priority queue first
    broker_transport = {**transport, "queue_order_strategy": "priority"}
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        # a build goes on while the broker is away: its claim's fence, not a cancel, keeps a second
        # delivery from doubling it, and its outcome is stored once Redis is back
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": broker_transport,
        "result_backend_transport_options": transport,
        "result_expires": settings.result_ttl_s,
        # buildq's record is the outcome (buildq status/wait); Celery's result backend is written
        # only when asked for (BUILDQ_TASK_RESULTS: producers polling AsyncResult)
        "task_ignore_result": not settings.task_results,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "task_time_limit": hard_limit,
        "task_default_queue": settings.queue,
        "task_create_missing_queues": True,
    }


def create_app(settings: Settings) -> Celery:
    """A Celery app configured from ``settings`` (tasks are sent by name; none is registered)."""
    app = Celery("buildq", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.buildq_settings = settings
    return app


_made: list[Celery] = []


def __getattr__(name: str) -> Celery:
    """``app`` (and ``celery``, Celery's other name for it): the app of the ``BUILDQ_*`` settings,
    made on first access, for ``celery -A buildq.celeryapp.app …``."""
    if name not in ("app", "celery"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not _made:
        from ..config import load_settings

        _made.append(create_app(load_settings()))
    return _made[0]
