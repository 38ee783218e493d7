"""``BUILDQ_LOG_FORMAT=json``: the worker's log as one JSON object per line, Celery's lines too.

:class:`JsonLogFormatter` writes ``time`` (RFC 3339, UTC), ``level``, ``logger``, ``pid`` and
``message``, then the fields a line carries: the engine's build lines give ``event``, ``job_id``,
``attempt``, ``daemon``, ``phase``, ``duration_s`` … (:class:`buildq.engine.hooks.LogHook`);
Celery's task lines (``received``, ``retry``, ``succeeded``) give the task id, which is the job id;
a line logged while a build runs in a pool process names that job. A traceback is the
``exception`` field of its line, so a line is always one line.

:func:`install_json_logging` puts the formatter on every handler Celery sets up (the root logger's,
the task logger's, the pool's) and routes Python warnings through them; the worker is started with
``--quiet`` so Celery prints no banner.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ..contract.record import iso
from ..names import TASK_NAME

#: fields a log record may carry (``extra``), written when set
FIELDS = (
    "event", "job_id", "attempt", "daemon", "routing", "queue", "phase", "state", "outcome", "reason",
    "error_kind", "error", "duration_s", "delay_s", "phases", "digest",
)  # fmt: skip


def _current_task() -> tuple[str, str] | None:
    """(task name, id) of the task this process runs now, if any."""
    from celery._state import get_current_task

    task = get_current_task()
    request = getattr(task, "request", None) if task is not None else None
    task_id = getattr(request, "id", None)
    return (str(task.name), str(task_id)) if task is not None and task_id else None


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        data = getattr(record, "data", None)  # Celery's task lines carry their context here
        task = (str(data.get("name")), str(data["id"])) if isinstance(data, dict) and data.get("id") else None
        if isinstance(data, dict) and isinstance(data.get("runtime"), int | float):
            out.setdefault("duration_s", round(data["runtime"], 3))
        task = task or _current_task()
        if task is not None:
            name, task_id = task
            out.setdefault("job_id" if name == TASK_NAME else "task_id", task_id)
            out.setdefault("task", name)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def install_json_logging() -> JsonLogFormatter:
    """From now on, the handlers Celery sets up for the worker format JSON (call before the
    worker starts)."""
    from celery.signals import after_setup_logger, after_setup_task_logger
    from celery.utils.log import get_multiprocessing_logger

    formatter = JsonLogFormatter()
    # what is said before Celery sets up its handlers (its warning about running as root, …) goes
    # through this one, which Celery replaces (``worker_hijack_root_logger``)
    early = logging.StreamHandler()
    early.setFormatter(formatter)
    logging.getLogger().addHandler(early)
    logging.captureWarnings(True)

    def use_json(logger: logging.Logger | None = None, **_: object) -> None:
        pool = get_multiprocessing_logger()
        for each in (logger, pool):
            for handler in getattr(each, "handlers", None) or ():
                handler.setFormatter(formatter)

    after_setup_logger.connect(use_json, weak=False)
    after_setup_task_logger.connect(use_json, weak=False)
    return formatter
