"""What the ``buildq`` commands share: the exit codes, dying with a message, the settings, a record
printed as JSON or as its terminal view."""

from __future__ import annotations

import json
from typing import Any

import typer

from ..config import Settings, SettingsError, load_settings

EXIT_FAILED, EXIT_INVALID, EXIT_TIMEOUT, EXIT_REDIS = 1, 2, 3, 4


def die(message: str, code: int) -> None:
    typer.echo(f"buildq: {message}", err=True)
    raise typer.Exit(code)


def cli_settings() -> Settings:
    try:
        settings = load_settings()
    except SettingsError as exc:
        die(str(exc), EXIT_INVALID)
        raise  # unreachable
    from .quick import remember_valid

    remember_valid()  # the next ``buildq status`` with these settings may take the quick path
    return settings


def state_exit(record: dict[str, Any]) -> int:
    return 0 if record.get("state") == "succeeded" else EXIT_FAILED


def print_record(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(record, indent=2))
        return
    from .views import render_record

    render_record(record)
