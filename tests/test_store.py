"""The store's named protocol against a real Redis: every script, and every fence it keeps.

Each fence is tested directly: a holder whose claim generation moved on (another delivery claimed
the job) or whose job has a result can never renew, requeue, finish or release; the affinity
memory keeps only successes; a slot wait honours the daemon to avoid; a message that is not the
job's current delivery can neither claim nor reject it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from buildq.contract.wire import build_message
from buildq.store.jobs import Claimed, Fence, Finished, JobStore, NotOurs
from buildq.store.keys import (
    AFFINITY_PREFIX,
    BASELINE_PREFIX,
    CANCELS_CHANNEL,
    QUEUED_INDEX,
    RECENT_INDEX,
    SLOTS_PREFIX,
    job_keys,
)
from buildq.store.scripts import LUA_DIR, PARTS, Script, read_names
from tests.harness import REDIS_URL, CountingRedis, counting_client

DB_URL = f"{REDIS_URL}/13"
D = ["tcp://bk-0:1234", "tcp://bk-1:1234"]


@pytest.fixture
def client() -> Iterator[CountingRedis]:
    yield from counting_client(DB_URL)


@pytest.fixture
def store(client: CountingRedis) -> JobStore:
    return JobStore(client, result_ttl_s=60)


def submit(store: JobStore, job_id: str, *, delivery: str = "d1", queue: str = "q") -> bytes:
    job = {"job_id": job_id, "context": "/ctx", "tags": ["r/app:1"]}
    message = build_message(job_id, queue, job, delivery=delivery, delivery_tag="tag-" + delivery)
    assert store.submit(job_id, queue=queue, message=message, tag="tag-" + delivery, delivery=delivery,
                        body=json.dumps(job))  # fmt: skip
    return message


def claim(store: JobStore, job_id: str, *, delivery: str = "d1", **kw: Any) -> Any:
    options: dict[str, Any] = dict(
        daemons=D, prefer=0, limit=1, ttl_s=30, worker="host:1", domain="dom-a", body="{}", queue="q"
    )
    return store.claim(job_id, delivery=delivery, **{**options, **kw})


def claimed(store: JobStore, job_id: str, **kw: Any) -> Claimed:
    got = claim(store, job_id, **kw)
    assert isinstance(got, Claimed), got
    return got


def fence(got: Claimed, job_id: str) -> Fence:
    return Fence(job_id, got.token, got.gen)


def finish(store: JobStore, f: Fence, state: str = "succeeded", **kw: Any) -> bool:
    record = json.dumps({"job_id": f.job_id, "state": state})
    return store.finish(f, record=record, state=state, daemon=kw.pop("daemon", None), **kw)


def requeue(store: JobStore, f: Fence, **kw: Any) -> bool:
    options: dict[str, Any] = dict(
        queue="q", message=b"next", tag="t2", delivery="d2", countdown=0.0, phase="retry_wait",
        attempts=[{"number": 1}], window_start=5.0, waiting_since=None, avoid=None, daemon=None,
    )  # fmt: skip
    return store.requeue(f, **{**options, **kw})


# -- the protocol's names ----------------------------------------------------------------------


def test_every_script_names_its_keys_and_arguments_at_the_top() -> None:
    for path in sorted(LUA_DIR.glob("*.lua")):
        if path.stem in {"prelude", "slots_fn", "result_fn"}:
            continue
        text = path.read_text()
        script = Script(path.stem)
        uses = set(re.findall(r"\b(KEYS|ARGV)\[", text))
        # beyond the named locals at the top, no script reads KEYS[i] or ARGV[i] by position
        body = [line for line in text.splitlines() if not line.startswith("local ")]
        assert not [line for line in body if re.search(r"(KEYS|ARGV)\[", line)], path.name
        assert uses <= {"KEYS", "ARGV"} and (script.keys.fixed or script.keys.tail), path.name


def test_a_name_missing_or_unknown_fails_at_once_naming_it() -> None:
    script = Script("release")
    with pytest.raises(TypeError, match=r"missing \['error'\]"):
        script.positional({"lease_key": "l", "job_hash": "h", "slot_set": "", "token": "t", "gen": 1})
    with pytest.raises(TypeError, match=r"unknown \['tokn'\]"):
        script.positional({"lease_key": "l", "job_hash": "h", "slot_set": "", "token": "t", "gen": 1,
                           "error": "", "tokn": "x"})  # fmt: skip


def test_names_out_of_order_are_refused() -> None:
    with pytest.raises(ValueError, match="positions"):
        read_names("local a = KEYS[1]\nlocal b = KEYS[3]\n", "KEYS")
    with pytest.raises(ValueError, match="tail"):
        read_names("local a = ARGV[1]\nlocal rest = {unpack(ARGV, 3)}\n", "ARGV")


def test_the_shared_parts_are_where_they_are_used() -> None:
    for name, parts in PARTS.items():
        text = (LUA_DIR / f"{name}.lua").read_text()
        if "result_fn" in parts:
            assert "store_result(" in text or "still_holds(" in text, name
        if "slots_fn" in parts:
            assert "take_any(" in text or "take_remembered(" in text, name


# -- submit ------------------------------------------------------------------------------------


def test_a_submit_pushes_once_and_times_the_job_by_the_server(store: JobStore, client) -> None:
    message = submit(store, "s1")
    assert client.lrange("q", 0, -1) == [message]
    info = store.info("s1")
    server_now = client.time()[0]
    assert info["state"] == "queued" and info["delivery"] == "d1" and info["msg"].encode() == message
    assert abs(float(info["enqueued_at"]) - server_now) < 5
    assert client.zscore(QUEUED_INDEX, "s1") and client.zscore(RECENT_INDEX, "s1")
    # the same job id again (a producer retrying a submit whose reply it lost): nothing more
    again = build_message("s1", "q", {"job_id": "s1"}, delivery="other", delivery_tag="t9")
    assert not store.submit("s1", queue="q", message=again, tag="t9", delivery="other", body="{}")
    assert client.llen("q") == 1 and store.info("s1")["delivery"] == "d1"


# -- claim -------------------------------------------------------------------------------------


def test_a_claim_takes_lease_generation_and_slot_in_one_round_trip(store: JobStore, client) -> None:
    submit(store, "c1")
    warm = claimed(store, "warm", delivery="")  # loads the script
    store.release(fence(warm, "warm"), daemon=warm.daemon)
    client.calls.clear()
    got = claimed(store, "c1")
    assert client.calls == ["EVALSHA"]
    assert (got.gen, got.daemon, got.cancelled) == (1, D[0], False)
    assert client.get(job_keys("c1").lease) == got.token.encode()
    assert client.zscore(SLOTS_PREFIX + D[0], got.token) is not None
    assert abs(got.redis_now - client.time()[0]) < 5
    assert got.history.attempts == () and got.history.running is None
    info = store.info("c1")
    assert info["gen"] == "1" and info["holder"] == "host:1" and json.loads(info["running"])["daemon"] == D[0]


def test_a_finished_job_returns_its_record_and_touches_nothing(store: JobStore, client) -> None:
    client.set(job_keys("f").result, json.dumps({"job_id": "f", "state": "succeeded"}))
    assert claim(store, "f") == Finished({"job_id": "f", "state": "succeeded"})
    assert client.exists(job_keys("f").lease, job_keys("f").hash, SLOTS_PREFIX + D[0]) == 0


def test_a_message_that_is_not_the_current_delivery_cannot_claim(store: JobStore) -> None:
    submit(store, "st", delivery="now")
    assert claim(store, "st", delivery="old") == NotOurs(held=False)
    assert store.lease_holder("st") is None


def test_a_held_lease_makes_the_claim_not_ours(store: JobStore) -> None:
    submit(store, "h")
    owner = claimed(store, "h")
    assert claim(store, "h") == NotOurs(held=True)
    assert store.lease_holder("h") == owner.token


def test_a_raw_message_without_a_submit_is_timed_at_its_first_claim(store: JobStore, client) -> None:
    got = claimed(store, "raw", delivery="", body='{"job_id":"raw"}')
    assert abs(got.history.enqueued_at - client.time()[0]) < 5
    assert store.info("raw")["job"] == '{"job_id":"raw"}' and store.info("raw")["delivery"] == ""


def test_a_cancelled_job_gets_the_lease_but_no_slot(store: JobStore, client) -> None:
    client.set(job_keys("x").cancel, "1")
    got = claimed(store, "x")
    assert got.cancelled and got.daemon is None
    assert client.exists(SLOTS_PREFIX + D[0], SLOTS_PREFIX + D[1]) == 0


def test_the_least_loaded_daemon_and_none_when_all_are_full(store: JobStore) -> None:
    assert claimed(store, "a").daemon == D[0]
    assert claimed(store, "b").daemon == D[1]
    full = claimed(store, "c")
    assert full.daemon is None and store.lease_holder("c") == full.token


def test_a_claim_after_a_dead_holder_gets_its_run_and_domain(store: JobStore) -> None:
    first = claimed(store, "lost")
    store.redis.delete(job_keys("lost").lease)  # its worker died: the lease expired
    second = claimed(store, "lost", domain="dom-b")
    assert second.gen == 2
    assert second.history.running is not None and second.history.running["daemon"] == first.daemon
    assert second.history.previous_domain == "dom-a"


def test_the_claim_avoids_the_daemon_its_last_attempt_lost(store: JobStore) -> None:
    got = claimed(store, "av")
    assert got.daemon == D[0]
    assert requeue(store, fence(got, "av"), avoid=D[0], daemon=got.daemon)
    again = claimed(store, "av", delivery="d2")
    assert again.daemon == D[1]  # D[0] is free too, but was the one that dropped the build
    assert again.history.attempts == ({"number": 1},) and again.history.window_start == 5.0


def test_affinity_prefers_the_remembered_daemon_and_waits_for_it_when_asked(store: JobStore, client) -> None:
    client.set(AFFINITY_PREFIX + "repo:cache", D[1])
    got = claimed(store, "af", cache_key="repo:cache")
    assert (got.daemon, got.preferred) == (D[1], D[1])
    full = claimed(store, "af2", cache_key="repo:cache", affinity_wait=True)
    assert (full.daemon, full.preferred, full.preferred_full) == (None, D[1], True)
    other = claimed(store, "af3", cache_key="repo:cache")
    assert (other.daemon, other.preferred_full) == (D[0], False)


# -- the holder's steps and their fences -------------------------------------------------------


def test_renewal_extends_the_lease_and_the_slot_each_time(store: JobStore, client) -> None:
    got = claimed(store, "rn", ttl_s=0.5)
    f = fence(got, "rn")
    for _ in range(3):  # every renewal extends it again (not only the first)
        client.pexpire(f.keys.lease, 50)
        assert store.renew(f, ttl_s=5, daemon=got.daemon) == "ok"
        assert client.pttl(f.keys.lease) > 1000
        slot_expiry = client.zscore(SLOTS_PREFIX + D[0], got.token)
        assert slot_expiry is not None and slot_expiry > (client.time()[0] + 4) * 1000


def test_renewal_retakes_an_expired_lease_only_while_nobody_claimed_since(store: JobStore, client) -> None:
    got = claimed(store, "gen")
    f = fence(got, "gen")
    client.delete(f.keys.lease)
    assert store.renew(f, ttl_s=5, daemon=None) == "ok"  # same generation: still ours
    client.delete(f.keys.lease)
    newer = claimed(store, "gen", domain="dom-b")  # a takeover: generation 2
    client.delete(f.keys.lease)  # even with the lease free again, the old holder is out for good
    assert store.renew(f, ttl_s=5, daemon=None) == "fenced"
    assert store.lease_holder("gen") is None
    assert store.renew(fence(newer, "gen"), ttl_s=5, daemon=None) == "ok"


def test_renewal_reports_a_cancel(store: JobStore, client) -> None:
    got = claimed(store, "cn")
    client.set(job_keys("cn").cancel, "1")
    assert store.renew(fence(got, "cn"), ttl_s=5, daemon=None) == "cancel"


def test_a_cancel_sets_the_flag_and_tells_the_workers(store: JobStore, client) -> None:
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(CANCELS_CHANNEL)
    pubsub.get_message(timeout=1)  # the subscription's confirmation
    store.request_cancel("cc")
    message = pubsub.get_message(timeout=2)
    pubsub.close()
    assert message is not None and message["data"] == b"cc"
    assert store.cancel_requested("cc")


def test_a_requeue_publishes_the_next_message_and_gives_the_claim_back(store: JobStore, client) -> None:
    submit(store, "rq")
    got = claimed(store, "rq")
    f = fence(got, "rq")
    assert requeue(store, f, countdown=2.0, avoid=D[0], daemon=got.daemon, waiting_since=7.5)
    assert client.lrange("q", 0, 0) == [b"next"]
    info = store.info("rq")
    assert (info["state"], info["phase"], info["delivery"], info["avoid"], info["waiting_since"]) == (
        "queued",
        "retry_wait",
        "d2",
        D[0],
        "7.5",
    )
    assert json.loads(info["attempts"]) == [{"number": 1}] and "running" not in info
    assert store.lease_holder("rq") is None and client.zscore(SLOTS_PREFIX + D[0], got.token) is None
    assert client.zscore(QUEUED_INDEX, "rq") > client.time()[0]  # due after its countdown


def test_a_requeue_by_a_holder_that_lost_its_claim_publishes_nothing(store: JobStore, client) -> None:
    submit(store, "rf")
    old = claimed(store, "rf")
    client.delete(job_keys("rf").lease)
    claimed(store, "rf", domain="dom-b")  # generation 2 holds it now
    before = client.llen("q")
    assert not requeue(store, fence(old, "rf"))
    assert client.llen("q") == before and store.info("rf")["delivery"] == "d1"
    stolen = Fence("rf", "not-the-token", 2)  # right generation, wrong lease token
    assert not requeue(store, stolen)


def test_finish_stores_everything_in_one_round_trip(store: JobStore, client) -> None:
    submit(store, "fi")
    got = claimed(store, "fi")
    other = claimed(store, "fi2")  # holds the other daemon's slot: must keep it
    finish(store, fence(claimed(store, "warm"), "warm"), state="failed")  # loads the script
    pubsub = client.pubsub()
    pubsub.subscribe(job_keys("fi").done)
    client.calls.clear()
    entries = [(1, "plain", "#1 DONE 0.1s"), (1, "mark", "final: succeeded")]
    assert finish(store, fence(got, "fi"), daemon=got.daemon, log_entries=entries, log_maxlen=100,
                  log_ttl_s=50)  # fmt: skip
    assert client.calls == ["EVALSHA"]
    assert store.result("fi") == {"job_id": "fi", "state": "succeeded"}
    info = store.info("fi")
    assert (
        (info["state"], info["phase"]) == ("succeeded", "done")
        and "msg" not in info
        and "running" not in info
    )
    stream = client.xrange(job_keys("fi").log)
    assert [(int(f[b"a"]), f[b"k"].decode(), f[b"l"].decode()) for _, f in stream] == [
        (1, "plain", "#1 DONE 0.1s"), (1, "mark", "final: succeeded")
    ]  # fmt: skip
    assert 0 < client.ttl(job_keys("fi").log) <= 50
    assert store.lease_holder("fi") is None and client.zscore(QUEUED_INDEX, "fi") is None
    assert client.zscore(SLOTS_PREFIX + got.daemon, got.token) is None
    assert client.zscore(SLOTS_PREFIX + other.daemon, other.token) is not None
    messages = [m for m in iter(lambda: pubsub.get_message(timeout=1), None) if m["type"] == "message"]
    pubsub.close()
    assert [m["data"] for m in messages] == [b"succeeded"]


def test_a_finish_by_a_holder_that_lost_its_claim_writes_nothing(store: JobStore, client) -> None:
    old = claimed(store, "ff")
    client.delete(job_keys("ff").lease)
    new = claimed(store, "ff", domain="dom-b")
    assert not finish(store, fence(old, "ff"), state="failed", log_entries=[(1, "mark", "x")], log_maxlen=10,
                      log_ttl_s=10)  # fmt: skip
    assert store.result("ff") is None and client.exists(job_keys("ff").log) == 0
    assert store.lease_holder("ff") == new.token
    assert finish(store, fence(new, "ff"))
    # the same claim again (its reply was lost and it tries again): stored already, nothing rewritten
    assert finish(store, fence(new, "ff"), state="failed")
    assert store.result("ff") == {"job_id": "ff", "state": "succeeded"}


def test_only_a_success_is_remembered_for_the_cache_and_joins_the_baseline(store: JobStore, client) -> None:
    base = (BASELINE_PREFIX + "repo:cache", b'{"p":{}}', 5, 100)
    failed = claimed(store, "m1")
    assert finish(store, fence(failed, "m1"), state="failed", daemon=failed.daemon, remember="repo:cache",
                  baseline=base)  # fmt: skip
    assert client.get(AFFINITY_PREFIX + "repo:cache") is None
    assert client.llen(BASELINE_PREFIX + "repo:cache") == 0
    ok = claimed(store, "m2")
    assert finish(store, fence(ok, "m2"), daemon=ok.daemon, remember="repo:cache", baseline=base)
    assert client.get(AFFINITY_PREFIX + "repo:cache") == ok.daemon.encode()
    assert client.lrange(BASELINE_PREFIX + "repo:cache", 0, -1) == [b'{"p":{}}']


def test_progress_is_written_only_while_the_claim_is_ours(store: JobStore, client) -> None:
    old = claimed(store, "pg")
    assert store.progress(fence(old, "pg"), {"phase": "build"})
    client.delete(job_keys("pg").lease)
    claimed(store, "pg", domain="dom-b")
    assert not store.progress(fence(old, "pg"), {"phase": "push"})
    assert store.info("pg")["phase"] == "build"


def test_release_gives_back_only_what_is_ours_and_keeps_the_error(store: JobStore, client) -> None:
    got = claimed(store, "rl")
    assert store.release(fence(got, "rl"), daemon=got.daemon, error="OSError: disk full")
    assert store.lease_holder("rl") is None and client.zscore(SLOTS_PREFIX + D[0], got.token) is None
    assert json.loads(store.info("rl")["running"])["error"] == "OSError: disk full"
    again = claimed(store, "rl")
    assert not store.release(fence(got, "rl"), daemon=None)  # generation 1 is not the holder now
    assert store.lease_holder("rl") == again.token


def test_take_slot_honours_the_daemon_to_avoid(store: JobStore) -> None:
    f = Fence("ts", "tok", 1)
    assert store.take_slot(f, D, prefer=0, limit=2, ttl_s=30, avoid=D[0]) == D[1]
    g = Fence("ts2", "tok2", 1)
    assert store.take_slot(g, D, prefer=0, limit=1, ttl_s=30, avoid=D[0]) == D[0]  # no other has room


# -- reject ------------------------------------------------------------------------------------


def test_a_rejection_is_stored_for_the_jobs_own_delivery_only(store: JobStore) -> None:
    submit(store, "victim", delivery="real")
    record = json.dumps({"job_id": "victim", "state": "failed"})
    assert not store.reject("victim", delivery="forged", record=record)
    assert store.result("victim") is None and store.info("victim")["state"] == "queued"
    assert not store.reject("victim", delivery="", record=record)
    assert store.reject("victim", delivery="real", record=record)
    assert store.result("victim") == {"job_id": "victim", "state": "failed"}


def test_a_rejection_never_ends_a_job_another_delivery_runs(store: JobStore) -> None:
    submit(store, "busy")
    claimed(store, "busy")
    assert not store.reject("busy", delivery="d1", record=json.dumps({"job_id": "busy", "state": "failed"}))
    assert store.result("busy") is None


def test_a_raw_job_never_seen_can_be_rejected(store: JobStore) -> None:
    assert store.reject("raw-bad", delivery="", record=json.dumps({"job_id": "raw-bad", "state": "failed"}))
    assert store.info("raw-bad")["state"] == "failed"


# -- waiting for a result ----------------------------------------------------------------------


def test_waiting_returns_a_result_stored_later(store: JobStore) -> None:
    import threading

    record = json.dumps({"job_id": "w1", "state": "succeeded"})
    timer = threading.Timer(0.05, store.reject, args=("w1",), kwargs={"delivery": "", "record": record})
    timer.start()
    assert store.wait_result("w1", timeout=10) == {"job_id": "w1", "state": "succeeded"}
    timer.join()
    assert store.wait_result("never", timeout=0.05) is None


def test_the_lua_files_are_the_packaged_ones() -> None:
    assert LUA_DIR == Path(__import__("buildq.store.scripts").store.scripts.__file__).with_name("lua")


def test_heartbeats_keep_workers_and_domains_live_by_the_server_clock(store: JobStore, client) -> None:
    from buildq.store.keys import DOMAINS, WORKERS

    now = store.heartbeat(worker="w1@h", domain="host-a", ttl_s=5)
    assert abs(now - client.time()[0]) < 5
    store.heartbeat(worker="w2@h", domain="host-b", ttl_s=0.05)
    assert set(store.live(WORKERS)) == {"w1@h", "w2@h"}
    import time

    time.sleep(0.1)
    assert set(store.live(WORKERS)) == {"w1@h"} and set(store.live(DOMAINS)) == {"host-a"}


def test_a_claim_requeue_or_finish_whose_reply_was_lost_can_be_sent_again(store: JobStore, client) -> None:
    """The client tries a command again when the connection dropped after Redis ran it: each script
    then says what it did the first time, and does nothing twice."""
    submit(store, "again")
    got = claimed(store, "again")
    token = got.token
    import uuid as _uuid

    orig = _uuid.uuid4
    try:  # the same claim again, with the same token
        _uuid.uuid4 = lambda: _uuid.UUID(hex=token)  # type: ignore[assignment]
        twice = claimed(store, "again")
    finally:
        _uuid.uuid4 = orig  # type: ignore[assignment]
    assert (twice.gen, twice.token, twice.history.running) == (got.gen, token, None)
    f = fence(got, "again")
    assert requeue(store, f, delivery="d2") and requeue(store, f, delivery="d2")
    assert client.llen("q") == 2  # the submit's message and one requeued message, not two
