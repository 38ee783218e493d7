"""Names shared by producers, workers and the janitor (a leaf module: it imports nothing).

The Celery task name and the ``BUILDING`` task state are part of the wire contract: producers in
other languages put ``TASK_NAME`` in their messages, Flower shows ``BUILDING`` while buildctl runs.
"""

#: the Celery task that runs one build
TASK_NAME = "buildq.build"
#: custom Celery state while buildctl runs; ``info`` holds ``{"job_id", "attempt", "phase"}``
BUILDING = "BUILDING"
