"""The build engine, without Celery: what a worker does with one build (see ``service.py``)."""
