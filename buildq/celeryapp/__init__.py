"""The Celery shell: the app, the ``buildq.build`` task, the worker entry, events, the wire format.

Producers import only ``app`` and ``producer``; ``task``, ``worker`` and ``events`` are the
worker's and import the build engine.
"""
