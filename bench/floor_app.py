"""The floor for bench/overhead.py: a bare Celery task with buildq's worker settings (late acks,
prefetch 1, reject on worker lost, events on) that spawns the same buildctl stand-in and returns."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

from celery import Celery

app = Celery("floor", broker=os.environ["FLOOR_BROKER_URL"], backend=os.environ["FLOOR_RESULT_BACKEND"])
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_send_task_events=True,
    task_send_sent_event=True,
    broker_transport_options={"visibility_timeout": 21600},
)
STANDIN = os.environ["FLOOR_STANDIN"]
# the same memory-backed scratch place buildq's local launcher uses, so file costs compare like for like
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else None


@app.task(name="floor.run", acks_late=True)
def run(job_id: str) -> dict[str, str]:
    workdir = tempfile.mkdtemp(prefix="floor-", dir=SCRATCH)
    try:
        proc = subprocess.Popen(
            [STANDIN, "--metadata-file", f"{workdir}/metadata.json"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert proc.stderr is not None
        for _ in iter(proc.stderr.readline, b""):
            pass
        proc.wait()
        with open(f"{workdir}/metadata.json") as fh:
            digest = json.load(fh)["containerimage.digest"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"job_id": job_id, "digest": digest}
