"""buildq: a Celery worker pool that turns queued build jobs into pushed images via buildctl."""

__version__ = "0.1.0"

import logging as _logging

# a library says nothing unless its user configured logging (the worker does; the CLI prints its
# own one-line errors)
_logging.getLogger("buildq").addHandler(_logging.NullHandler())
