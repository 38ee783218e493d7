"""Producers: the Python client, and a raw Celery protocol v2 message pushed with plain Redis
commands exactly as a Node.js (or any) producer would, both get builds; priority queues."""

from __future__ import annotations

import base64
import json
import time
import uuid

import redis

from tests.conftest import scenario
from tests.harness import client_for, wait_until


def raw_celery_message(task_id: str, queue: str, kwargs: dict) -> bytes:
    """Celery message protocol v2 as the Redis transport stores it (see docs/api.md)."""
    body = json.dumps([[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    return json.dumps(
        {
            "body": base64.b64encode(body.encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "js",
                "task": "buildq.build",
                "id": task_id,
                "root_id": task_id,
                "parent_id": None,
                "group": None,
                "retries": 0,
                "eta": None,
                "expires": None,
                "shadow": None,
                "timelimit": [None, None],
                "argsrepr": "()",
                "kwargsrepr": "{}",
                "origin": "node-producer",
            },
            "properties": {
                "correlation_id": task_id,
                "reply_to": "",
                "delivery_mode": 2,
                "priority": 0,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    ).encode()


def test_raw_protocol_v2_message_from_plain_redis_gets_a_build(
    buildq_env, start_worker, context_dir, standin_log
):
    start_worker(buildq_env)
    job_id = "from-node-1"
    job = {"job_id": job_id, "context": str(context_dir), "tags": ["reg:5000/node/app:1"]}
    r = redis.Redis.from_url(buildq_env["BUILDQ_BROKER_URL"])
    r.lpush(
        buildq_env["BUILDQ_QUEUE"],
        raw_celery_message(job_id, buildq_env["BUILDQ_QUEUE"], {"job": job, "enqueued_at": time.time()}),
    )
    record = client_for(buildq_env).wait(job_id, timeout=60)
    assert record["state"] == "succeeded"
    assert record["image"]["names"] == ["reg:5000/node/app:1"]
    assert record["image"]["digest"].startswith("sha256:")
    assert len(standin_log.starts()) == 1


def test_raw_message_with_invalid_job_is_rejected_with_the_field(buildq_env, start_worker, standin_log):
    start_worker(buildq_env)
    job = {"job_id": "from-node-2", "context": "/srv/x", "tags": ["reg/app:1"], "cache_mode": "everything"}
    r = redis.Redis.from_url(buildq_env["BUILDQ_BROKER_URL"])
    r.lpush(
        buildq_env["BUILDQ_QUEUE"],
        raw_celery_message("from-node-2", buildq_env["BUILDQ_QUEUE"], {"job": job}),
    )
    record = client_for(buildq_env).wait("from-node-2", timeout=60)
    assert record["state"] == "failed"
    assert record["error"]["kind"] == "invalid" and record["error"]["field"] == "cache_mode"
    assert standin_log.events() == []


def test_high_priority_jobs_overtake_the_normal_queue(buildq_env, context_dir, start_worker, standin_log):
    client = client_for(buildq_env)
    quick = scenario(kind="succeed")
    normal = [
        client.submit(
            {
                "context": str(context_dir),
                "tags": [f"reg/normal{i}:1"],
                "build_args": {"STANDIN_SCENARIO": quick},
            }
        )
        for i in range(4)
    ]
    high = client.submit(
        {
            "context": str(context_dir),
            "tags": ["reg/urgent:1"],
            "priority": "high",
            "build_args": {"STANDIN_SCENARIO": quick},
        }
    )
    start_worker(buildq_env, concurrency=1)  # starts with all five queued
    for handle in [*normal, high]:
        assert handle.wait(timeout=60)["state"] == "succeeded"
    order = [s["key"] for s in standin_log.starts()]
    assert order[0] == "reg/urgent:1"
    wait_until(lambda: len(standin_log.ends()) == 5, timeout=10)
