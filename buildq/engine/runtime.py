"""The build runtime of one worker process, made from the settings (nothing at import time)."""

from __future__ import annotations

from ..config import Settings
from ..launchers import make_launcher
from ..store.connect import redis_client, replicas_for
from ..store.daemons import DaemonHealth
from ..store.jobs import JobStore
from ..store.logs import LogStore
from ..store.slots import DaemonSlots
from .metrics import BuildMetrics, NoMetrics
from .service import BuildService


def make_service(settings: Settings) -> BuildService:
    """The build runtime for this process (launcher, Redis stores, log store, metrics)."""
    client = redis_client(settings, socket_timeout=10, health_check_interval=30)
    store = JobStore(client, result_ttl_s=settings.result_ttl_s, replicas=replicas_for(settings, client))
    return BuildService(
        settings=settings,
        launcher=make_launcher(settings),
        store=store,
        slots=DaemonSlots(store.scripts),
        daemons=DaemonHealth(client),
        logs=LogStore(client, maxlen=settings.log_stream_maxlen, ttl_s=settings.log_stream_ttl_s),
        metrics=BuildMetrics() if settings.metrics_port is not None else NoMetrics(),
    )
