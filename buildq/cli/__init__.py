"""``buildq`` command line: worker, submit, status, cancel, list, retry, logs, health, schema.

Exit codes: 0 success; 1 the build failed or was cancelled (also a job the worker rejected after
it was enqueued), an unknown job, a job that cannot be cancelled or retried, or a failed upload;
2 invalid input or settings, before anything is enqueued (the reason goes to stderr); 3 timed
out waiting.

One module a command; what they share is in ``common``. A command imports what it needs (rich,
docker, celery, the client) when it runs, so ``buildq --help`` stays quick.
"""

from __future__ import annotations

import sys

import typer

from . import cancel, health, jobs, logs, retry, schema, status, submit, worker

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="buildq: container-image builds through a Celery queue."
)

# in the order ``buildq --help`` lists them
for _name, _command in (
    ("worker", worker.worker),
    ("submit", submit.submit),
    ("status", status.status),
    ("cancel", cancel.cancel),
    ("list", jobs.list_jobs),
    ("retry", retry.retry),
    ("logs", logs.logs),
    ("health", health.health),
    ("schema", schema.schema),
):
    app.command(name=_name, **getattr(_command, "command_options", {}))(_command)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
