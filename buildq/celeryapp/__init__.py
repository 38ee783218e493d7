"""The Celery shell around the engine: the app (``app.py``), the ``buildq.build`` task and each
process's runtime (``task.py``), the worker entry point and its signal handlers (``worker.py``).

Producers need none of it (the client submits with one script on Redis); ``celery -A
buildq.celeryapp.app inspect|control …`` finds the app made from the ``BUILDQ_*`` settings.
"""
