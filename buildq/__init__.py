"""buildq: a Celery worker pool that turns queued build jobs into pushed images via buildctl."""

__version__ = "0.1.0"
