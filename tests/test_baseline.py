"""Baselines in Redis and ``explain`` through a real worker: record, ``buildq status``, Prometheus."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from rich.console import Console

from buildq.cli.views import render_record
from buildq.config import SettingsError, load_settings
from buildq.engine.hooks import BaselineHook, EndWrites
from buildq.engine.recording import parse_entries
from buildq.store.jobs import BASELINE_TTL_S, Claimed, Fence, JobStore
from buildq.store.keys import baseline_key
from tests.conftest import scenario
from tests.harness import REDIS_URL, CountingRedis, client_for, counting_client, free_port, run_cli
from tests.test_observability import scrape

DB_URL = f"{REDIS_URL}/13"
KEY = "reg:5000/team/app:buildcache"


@pytest.fixture
def client() -> Iterator[CountingRedis]:
    yield from counting_client(DB_URL)


def read_baseline(client: redis.Redis, key: str, n: int) -> list[dict[str, Any]]:
    """The baseline as the lifecycle reads it for ``explain`` (newest first, at most ``n``)."""
    return parse_entries(client.lrange(baseline_key(key), 0, n - 1))


def finish(store: JobStore, job_id: str, state: str, entry: dict[str, Any] | None, n: int) -> None:
    """Claim ``job_id`` and finish it in ``state`` with the write :class:`BaselineHook` adds for a
    record whose baseline entry is ``entry`` (None: it adds none)."""
    got = store.claim(job_id, delivery="", daemons=["tcp://bk:1"], limit=100, ttl_s=30,
                      worker="h:1", domain="h", body="{}", queue="q")  # fmt: skip
    assert isinstance(got, Claimed)
    writes = EndWrites()
    built = SimpleNamespace(cache_key=KEY)
    encoded = json.dumps(entry).encode() if entry is not None else None
    BaselineHook(n).finishing(built, SimpleNamespace(baseline_entry=encoded), writes)  # type: ignore[arg-type]
    assert (writes.baseline is None) == (entry is None)
    if isinstance(store.redis, CountingRedis):
        store.redis.calls.clear()
    record = json.dumps({"job_id": job_id, "state": state})
    fence = Fence(job_id, got.token, got.gen)
    assert store.finish(fence, record=record, state=state, baseline=writes.baseline)


def test_finish_adds_the_entry_in_its_round_trip_capped_and_expiring(client: CountingRedis) -> None:
    store = JobStore(client, result_ttl_s=60)
    finish(store, "warm", "failed", None, 3)  # loads the scripts
    for i in range(5):
        finish(store, f"b{i}", "succeeded", {"p": {"push": float(i)}, "s": {}}, 3)
        assert client.calls == ["EVALSHA"]  # no round trip of its own
    assert read_baseline(client, KEY, 3) == [{"p": {"push": p}, "s": {}} for p in (4.0, 3.0, 2.0)]
    assert client.llen(baseline_key(KEY)) == 5  # kept between N and 2N: trimmed once past 2N
    assert BASELINE_TTL_S - 5 < client.ttl(baseline_key(KEY)) <= BASELINE_TTL_S
    for i in range(5, 7):
        finish(store, f"b{i}", "succeeded", {"p": {"push": float(i)}, "s": {}}, 3)
    assert client.llen(baseline_key(KEY)) == 3  # the 7th passed 2N: back to N
    # a build that adds nothing (failed, retried) leaves the baseline alone
    finish(store, "f", "failed", None, 3)
    assert client.llen(baseline_key(KEY)) == 3
    # and a failed record never joins it, whatever the write carries
    finish(store, "f2", "failed", {"p": {"push": 9.0}, "s": {}}, 3)
    assert read_baseline(client, KEY, 3)[0] == {"p": {"push": 6.0}, "s": {}}
    assert read_baseline(client, "other:buildcache", 3) == []


def test_baseline_n_is_bounded() -> None:
    assert load_settings({}).baseline_n == 50
    assert load_settings({"BUILDQ_BASELINE_N": "200"}).baseline_n == 200
    for bad in ("4", "1001", "many"):
        with pytest.raises(SettingsError, match="BUILDQ_BASELINE_N"):
            load_settings({"BUILDQ_BASELINE_N": bad})


def test_render_prints_the_explanation_under_the_waterfall() -> None:
    flag = {"phase": "cache_import", "seconds": 31.2, "median": 0.4, "ratio": 78.0, "builds": 50}
    record = {
        "job_id": "j",
        "state": "succeeded",
        "phases": {"cache_import": 31.2, "build": 1.0, "total": 32.2},
        "explain": {"key": KEY, "builds": 50, "flagged": [flag], "summary": "…"},
    }
    out = io.StringIO()
    render_record(record, Console(file=out, width=200))
    text = out.getvalue()
    lines = text.splitlines()
    at = lines.index(f"unusually slow for {KEY}:")
    assert lines[at + 1] == "  cache_import 31.2 s, 78× its median of 0.4 s over the last 50 builds"
    assert text.index(" total ") < text.index("unusually slow")  # under the waterfall
    record["explain"] = {
        "key": KEY,
        "builds": 12,
        "flagged": [],
        "summary": "nothing unusual against the last 12 builds",
    }
    out = io.StringIO()
    render_record(record, Console(file=out, width=200))
    assert "explain: nothing unusual against the last 12 builds" in out.getvalue().splitlines()


def test_a_slow_build_is_explained_against_the_earlier_builds(
    buildq_env, start_worker, context_dir, tmp_path
) -> None:
    port = free_port()
    env = {**buildq_env, "BUILDQ_METRICS_PORT": str(port), "BUILDQ_METRICS_DIR": str(tmp_path / "prom")}
    start_worker(env, concurrency=1)
    client = client_for(env)
    # the stand-in pauses halfway through the capture, while "[internal] load build context" runs
    slow = scenario(kind="succeed", sleep_s=3.0)

    def build(scenario_json: str | None = None) -> dict:
        job: dict = {"context": str(context_dir), "tags": ["reg:5000/team/app:1"]}
        if scenario_json:
            job["build_args"] = {"STANDIN_SCENARIO": scenario_json}
        return client.submit(job).wait(timeout=60)

    first = build(slow)  # nothing to compare with yet: says so
    assert first["state"] == "succeeded" and first["phases"]["context"] >= 2.5
    assert first["explain"] == {
        "key": KEY,
        "builds": 0,
        "flagged": [],
        "summary": f"not compared: 0 earlier builds of {KEY} on record, 5 needed",
    }
    for _ in range(5):
        usual = build()
        assert usual["explain"]["flagged"] == []
        assert usual["explain"]["summary"] == "nothing unusual: no phase or step took 2 s or more"
    record = build(slow)
    explained = record["explain"]
    assert explained["builds"] == 6 and [f["phase"] for f in explained["flagged"]] == ["context"]
    flag = explained["flagged"][0]
    assert flag["seconds"] == record["phases"]["context"] >= 2.5 and flag["median"] < 0.1
    assert explained["summary"].startswith(f"context {record['phases']['context']:.1f} s")
    assert explained["summary"].endswith(" over the last 6 builds")
    # every build succeeded in one attempt: all seven are in the baseline now
    assert redis.Redis.from_url(env["BUILDQ_BROKER_URL"]).llen(baseline_key(KEY)) == 7

    shown = run_cli(env, "status", record["job_id"])
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[lines.index(f"unusually slow for {KEY}:") + 1] == "  " + explained["summary"]
    assert scrape(port)['buildq_slow_phases_total{phase="context"}'] == 1.0
