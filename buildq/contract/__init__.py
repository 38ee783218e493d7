"""What producers and workers agree on: the job (``job``), image references (``reference``), what an
operator grants producers (``grants``), the record every reader gets (``record``) and the message on
the queue (``wire``). Pure: nothing here talks to Redis, Celery or a process."""
