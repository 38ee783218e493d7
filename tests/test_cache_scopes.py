"""Cache scopes, the export lease and superseded builds: the contract, the argv and the store's fences.

The contract and the argv are pure; the lease and the supersede step run against a real Redis (the
session's own). The worker side (a build that skips its export, a running build killed by a newer
submit) is in ``tests/test_cache_scopes_worker.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from buildq.buildkit.command import BuildRequest, build_argv
from buildq.buildkit.phases import cache_evidence, step_stats
from buildq.buildkit.progress import ProgressTracker
from buildq.contract.job import cache_key, cache_refs, normalise_scope, parse_job
from buildq.contract.wire import build_message
from buildq.errors import InvalidJobError
from buildq.store.jobs import Claimed, Fence, JobStore
from buildq.store.keys import CANCELS_CHANNEL, export_lease_key, job_key, supersede_key
from tests.harness import REDIS_URL, CountingRedis, counting_client

DB_URL = f"{REDIS_URL}/12"
FIXTURES = Path(__file__).parent / "fixtures" / "buildkit"
TAG = "reg.example:5000/team/app:1"


def job(**extra: Any) -> Any:
    return parse_job({"context": "/ctx", "tags": [TAG], **extra})


# -- the contract ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "suffix"),
    [("main", "main"), ("feature/Login-Form", "feature-login-form"), ("PR #12: fix", "pr-12-fix"),
     ("..release_1.2--", "release_1.2"), ("ünïcode/ブランチ", "n-code")],
)  # fmt: skip
def test_a_scope_is_normalised_to_a_tag_safe_suffix(scope: str, suffix: str) -> None:
    assert normalise_scope(scope) == suffix
    assert job(cache_scope=scope).cache_scope == suffix
    assert normalise_scope(suffix) == suffix  # normalising again changes nothing


def test_long_scopes_are_cut_and_kept_apart_by_a_digest() -> None:
    a, b = "feature/" + "x" * 100 + "-a", "feature/" + "x" * 100 + "-b"
    assert len(normalise_scope(a)) == 64 and normalise_scope(a) != normalise_scope(b)
    export, _ = cache_refs(job(cache_scope=a), "main")
    parse_job({"context": "/ctx", "tags": [TAG], "cache_ref": export})  # still a valid reference


@pytest.mark.parametrize(
    ("extra", "field"),
    [({"cache_scope": "!!!"}, "cache_scope"), ({"cache_scope": "a\nb"}, "cache_scope"),
     ({"cache_scope": ""}, "cache_scope"), ({"cache_scope": 7}, "cache_scope"),
     ({"cache_scope": "x" * 256}, "cache_scope"), ({"supersede_key": "a b"}, "supersede_key"),
     ({"supersede_key": "{slot}"}, "supersede_key"), ({"supersede_key": "app:*"}, "supersede_key"),
     ({"supersede_key": "-x"}, "supersede_key"), ({"supersede_key": "k" * 201}, "supersede_key"),
     ({"supersede_key": "a\r\nDEL x"}, "supersede_key")],
)  # fmt: skip
def test_a_bad_scope_or_supersede_key_is_one_line_naming_the_field(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidJobError) as caught:
        job(**extra)
    assert caught.value.field == field
    assert "\n" not in caught.value.message and caught.value.message.startswith(field)


def test_the_refs_without_a_scope_are_the_cache_ref_both_ways() -> None:
    assert cache_refs(job(), "main") == ("reg.example:5000/team/app:buildcache",
                                         ["reg.example:5000/team/app:buildcache"])  # fmt: skip


def test_a_scoped_build_exports_to_its_scope_and_imports_it_then_the_default() -> None:
    export, imports = cache_refs(job(cache_scope="PR-7"), "Main")
    assert export == "reg.example:5000/team/app:buildcache-pr-7"
    assert imports == [export, "reg.example:5000/team/app:buildcache-main"]
    # the default scope's own builds, or no default: one import
    assert cache_refs(job(cache_scope="main"), "main")[1] == ["reg.example:5000/team/app:buildcache-main"]
    assert cache_refs(job(cache_scope="pr-7"), None)[1] == [export]
    # a named cache_ref is scoped the same way
    named = job(cache_scope="pr-7", cache_ref="reg.example:5000/team/cache:v2")
    assert cache_refs(named, "main")[1] == [
        "reg.example:5000/team/cache:v2-pr-7",
        "reg.example:5000/team/cache:v2-main",
    ]


def test_the_affinity_key_is_the_scope_s_ref() -> None:
    assert cache_key(job()) == "reg.example:5000/team/app:buildcache"
    assert cache_key(job(cache_scope="pr-7")) == "reg.example:5000/team/app:buildcache-pr-7"
    assert cache_key(job(cache_scope="pr-7")) != cache_key(job(cache_scope="main"))


# -- the argv ----------------------------------------------------------------------------------


def argv_of(scope: str | None, *, export: bool = True, default: str | None = "main") -> list[str]:
    j = job(cache_scope=scope) if scope else job()
    ref, imports = cache_refs(j, default)
    req = BuildRequest(tags=j.tags, cache_ref=ref, import_refs=imports, export_cache=export,
                       metadata_file="/m.json", context_dir="/ctx", dockerfile_dir="/ctx")  # fmt: skip
    return build_argv(req, insecure_registries=["reg.example:5000"])


def flags(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


def test_the_argv_imports_the_scope_then_the_default_and_exports_to_the_scope() -> None:
    argv = argv_of("pr-7")
    assert flags(argv, "--import-cache") == [
        "type=registry,ref=reg.example:5000/team/app:buildcache-pr-7,registry.insecure=true",
        "type=registry,ref=reg.example:5000/team/app:buildcache-main,registry.insecure=true",
    ]
    assert flags(argv, "--export-cache") == [
        "type=registry,ref=reg.example:5000/team/app:buildcache-pr-7,mode=max,oci-mediatypes=true,"
        "image-manifest=true,ignore-error=true,registry.insecure=true"
    ]


def test_without_a_scope_the_argv_is_as_before() -> None:
    argv = argv_of(None)
    assert flags(argv, "--import-cache") == [
        "type=registry,ref=reg.example:5000/team/app:buildcache,registry.insecure=true"
    ]
    assert len(flags(argv, "--export-cache")) == 1


def test_a_build_without_the_export_lease_imports_but_does_not_export() -> None:
    argv = argv_of("pr-7", export=False)
    assert flags(argv, "--export-cache") == []
    assert len(flags(argv, "--import-cache")) == 2


# -- the export lease (real Redis) ---------------------------------------------------------------


@pytest.fixture
def client() -> Iterator[CountingRedis]:
    yield from counting_client(DB_URL)


@pytest.fixture
def store(client: CountingRedis) -> JobStore:
    return JobStore(client, result_ttl_s=60)


KEY = "reg.example:5000/team/app:buildcache-main"


def test_the_first_build_takes_the_lease_and_renews_it(store: JobStore, client: Any) -> None:
    assert store.take_export(KEY, job_id="a", order=100.0, ttl_s=30) == ("granted", None)
    until = float(client.hget(export_lease_key(KEY), "until"))
    assert store.take_export(KEY, job_id="a", order=100.0, ttl_s=60) == ("granted", None)
    assert float(client.hget(export_lease_key(KEY), "until")) > until


def test_an_older_build_skips_while_a_newer_one_holds_the_lease(store: JobStore) -> None:
    assert store.take_export(KEY, job_id="new", order=200.0, ttl_s=30)[0] == "granted"
    assert store.take_export(KEY, job_id="old", order=100.0, ttl_s=30) == ("newer", "new")


def test_a_newer_build_waits_while_an_older_one_holds_it_then_takes_it(store: JobStore) -> None:
    assert store.take_export(KEY, job_id="old", order=100.0, ttl_s=30)[0] == "granted"
    assert store.take_export(KEY, job_id="new", order=200.0, ttl_s=30) == ("older", "old")
    assert store.release_export(KEY, job_id="old", order=100.0, exported=True)
    assert store.take_export(KEY, job_id="new", order=200.0, ttl_s=30) == ("granted", None)


def test_once_a_newer_build_exported_an_older_one_never_exports(store: JobStore) -> None:
    assert store.take_export(KEY, job_id="new", order=200.0, ttl_s=30)[0] == "granted"
    assert store.release_export(KEY, job_id="new", order=200.0, exported=True)
    assert store.take_export(KEY, job_id="old", order=100.0, ttl_s=30) == ("newer", "new")
    # a holder whose export did not complete leaves no such mark
    assert store.take_export(KEY, job_id="newest", order=300.0, ttl_s=30)[0] == "granted"
    assert store.release_export(KEY, job_id="newest", order=300.0, exported=False)
    assert store.take_export(KEY, job_id="mid", order=250.0, ttl_s=30) == ("granted", None)


def test_only_the_holder_releases_and_a_dead_holder_s_lease_lapses(store: JobStore, client: Any) -> None:
    assert store.take_export(KEY, job_id="old", order=100.0, ttl_s=30)[0] == "granted"
    assert not store.release_export(KEY, job_id="new", order=200.0, exported=True)
    assert client.hget(export_lease_key(KEY), "job") == b"old"
    client.hset(export_lease_key(KEY), "until", 0)  # its worker died: no renewal
    assert store.take_export(KEY, job_id="new", order=200.0, ttl_s=30) == ("granted", None)


def test_builds_of_other_refs_do_not_meet(store: JobStore) -> None:
    assert store.take_export(KEY, job_id="a", order=100.0, ttl_s=30)[0] == "granted"
    assert store.take_export(KEY + "x", job_id="b", order=50.0, ttl_s=30)[0] == "granted"


# -- supersede (real Redis) ----------------------------------------------------------------------


def submit(store: JobStore, job_id: str, key: str | None, *, delivery: str = "d1") -> None:
    body = {"job_id": job_id, "context": "/ctx", "tags": ["r/app:1"], "supersede_key": key}
    message = build_message(job_id, "q", body, delivery=delivery, delivery_tag="tag-" + delivery)
    assert store.submit(job_id, queue="q", message=message, tag="tag-" + delivery, delivery=delivery,
                        body=json.dumps(body), supersede=key)  # fmt: skip


def test_a_newer_submit_cancels_the_queued_older_job_in_the_same_step(store: JobStore, client: Any) -> None:
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(CANCELS_CHANNEL)
    submit(store, "j1", "app:main")
    submit(store, "j2", "app:main", delivery="d2")
    assert client.hmget(job_key("j1"), "cancel", "superseded_by") == [b"superseded", b"j2"]
    assert client.hget(job_key("j2"), "cancel") is None
    assert client.get(supersede_key("app:main")) == b"j2"
    heard = []
    deadline = time.monotonic() + 5
    while not heard and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=1)  # None for the subscription's own confirmation
        if message is not None:
            heard.append(message["data"])
    assert heard == [b"j1"]
    submit(store, "j3", "app:main", delivery="d3")  # each newer one cancels the one before
    assert client.hget(job_key("j2"), "superseded_by") == b"j3"
    pubsub.close()


def test_a_finished_job_is_never_superseded(store: JobStore, client: Any) -> None:
    submit(store, "j1", "app:main")
    got = store.claim("j1", delivery="d1", daemons=["tcp://bk:1"], limit=1, ttl_s=30, worker="w", domain="d",
                      body="{}", queue="q")  # fmt: skip
    assert isinstance(got, Claimed)
    record = json.dumps({"job_id": "j1", "state": "succeeded"})
    assert store.finish(Fence("j1", got.token, got.gen), record=record, state="succeeded")
    submit(store, "j2", "app:main", delivery="d2")
    assert client.hmget(job_key("j1"), "cancel", "superseded_by") == [None, None]
    assert client.get(supersede_key("app:main")) == b"j2"


def test_other_keys_and_jobs_without_a_key_are_left_alone(store: JobStore, client: Any) -> None:
    submit(store, "j1", "app:main")
    submit(store, "j2", "app:pr-7", delivery="d2")
    submit(store, "j3", None, delivery="d3")
    assert [client.hget(job_key(j), "cancel") for j in ("j1", "j2", "j3")] == [None, None, None]


def test_a_producer_s_own_message_supersedes_at_the_worker(store: JobStore, client: Any) -> None:
    submit(store, "j1", "app:main")
    # a stranger's raw message never ran submit.lua: its job hash does not exist yet
    assert store.supersede("raw", "app:main") == ("j1", None)
    assert client.hget(job_key("j1"), "superseded_by") == b"raw"
    # asked again (a redelivery), nothing more happens
    assert store.supersede("raw", "app:main") == (None, None)


def test_a_job_reaching_a_worker_after_a_newer_one_is_superseded_itself(store: JobStore, client: Any) -> None:
    submit(store, "j1", "app:main")
    submit(store, "j2", "app:main", delivery="d2")
    assert store.supersede("j1", "app:main") == (None, "j2")
    assert client.get(supersede_key("app:main")) == b"j2"


# -- the genuine capture of a scoped build with the fallback ---------------------------------------


def test_a_genuine_fallback_import_counts_as_imported_and_its_own_miss_is_no_error() -> None:
    capture = FIXTURES / "builds" / "scope_fallback_rawjson_regwarm"
    tracker = ProgressTracker()
    for line in capture.with_suffix(".stderr").read_text().splitlines():
        tracker.feed(line)
    metadata = json.loads(capture.with_suffix(".meta.json").read_text())
    names = [v.name for v in tracker.vertices.values() if v.name.startswith("importing cache manifest")]
    host = "127.0.0.1:56929/demo/scoped"
    assert sorted(names) == [f"importing cache manifest from {host}:buildcache-{s}" for s in ("main", "pr-2")]
    evidence = cache_evidence(tracker.vertices.values(), metadata, export_requested=True, succeeded=True)
    assert evidence.imported is True and evidence.import_error is None
    assert evidence.exported is True and evidence.export_outcome == "exported"
    assert step_stats(tracker)["cached"] == 1  # the RUN before the change, from main's cache


def test_buildq_status_says_why_a_build_did_not_export_and_who_superseded_it() -> None:
    from rich.console import Console

    from buildq.cli.views import render_record

    console = Console(record=True, width=200)
    ref = "reg:5000/team/app:buildcache-main"
    render_record({"job_id": "j", "state": "cancelled", "superseded_by": "j2",
                   "cache": {"ref": ref, "export": "skipped_newer", "error": None}}, console)  # fmt: skip
    text = console.export_text()
    assert f"not exported: a newer build of the ref exports it (skipped_newer; {ref})" in text
    assert "superseded by  j2" in text
