"""The store's named protocol against a real Redis: every script, and every fence it keeps.

Each fence is tested directly: a holder whose claim generation moved on (another delivery claimed
the job) or whose job has a record can never renew, requeue, finish or release; the affinity
memory keeps only successes; a slot wait honours the daemon to avoid; a message that is not the
job's current delivery can neither claim nor reject it; a daemon slot is counted once while a claim
holds it and given back exactly once, whichever step ends the claim.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from buildq.contract.wire import build_message
from buildq.store.jobs import Claimed, ExportRelease, Fence, Finished, JobStore, LogEnd, NotOurs
from buildq.store.keys import (
    AFFINITY_PREFIX,
    BASELINE_PREFIX,
    CANCELS_CHANNEL,
    DOWN_LOAD,
    JOBS_INDEX,
    export_lease_key,
    final_band,
    job_key,
    job_keys,
    load_key,
)
from buildq.store.logs import decode_lines
from buildq.store.scripts import LUA_DIR, PARTS, Script, read_names, script, script_names
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
        daemons=D, limit=1, ttl_s=30, worker="host:1", domain="dom-a", body="{}", queue="q"
    )
    return store.claim(job_id, delivery=delivery, **{**options, **kw})


def load(client: Any, daemon: str, daemons: list[str] = D) -> float:
    """The builds ``daemon`` runs, as its load index counts them."""
    return float(client.zscore(load_key(daemons), daemon) or 0)


def expire_lease(client: Any, job_id: str) -> None:
    """The holder stopped renewing and its lease ran out."""
    client.hset(job_key(job_id), "lease_until", 0)


def claimed(store: JobStore, job_id: str, **kw: Any) -> Claimed:
    got = claim(store, job_id, **kw)
    assert isinstance(got, Claimed), got
    return got


def fence(got: Claimed, job_id: str, cache_key: str | None = None) -> Fence:
    return Fence(job_id, got.token, got.gen, cache_key=cache_key)


def finish(store: JobStore, f: Fence, state: str = "succeeded", **kw: Any) -> bool:
    record = json.dumps({"job_id": f.job_id, "state": state})
    return store.finish(f, record=record, state=state, **kw)


def requeue(store: JobStore, f: Fence, **kw: Any) -> bool:
    options: dict[str, Any] = dict(
        queue="q", message=b"next", tag="t2", delivery="d2", phase="retry_wait",
        attempts=[{"number": 1}], window_start=5.0, waiting_since=None, avoid=None,
    )  # fmt: skip
    return store.requeue(f, **{**options, **kw})


# -- the protocol's names ----------------------------------------------------------------------


def test_every_script_names_its_keys_and_arguments_at_the_top() -> None:
    for path in sorted(LUA_DIR.glob("*.lua")):
        if path.stem in {part for parts in PARTS.values() for part in parts}:
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
        script.positional({"job_hash": "h", "jobs_index": "a", "gen": 1, "job_id": "j"})
    with pytest.raises(TypeError, match=r"unknown \['gne'\]"):
        script.positional({"job_hash": "h", "jobs_index": "a", "gen": 1, "job_id": "j", "error": "",
                           "gne": 1})  # fmt: skip


def test_names_out_of_order_are_refused() -> None:
    with pytest.raises(ValueError, match="positions"):
        read_names("local a = KEYS[1]\nlocal b = KEYS[3]\n", "KEYS")
    with pytest.raises(ValueError, match="tail"):
        read_names("local a = ARGV[1]\nlocal rest = {unpack(ARGV, 3)}\n", "ARGV")


def test_the_shared_parts_are_where_they_are_used() -> None:
    uses = {
        "job_fn": ("read(", "give_back("),
        "load_fn": ("least_loaded(", "DOWN_LOAD"),
        "queue_fn": ("head_stamp(", "put_back("),
        "export_fn": ("take_export(", "release_export("),
        "supersede_fn": ("supersede(",),
    }
    for name, parts in PARTS.items():
        for n, part in enumerate(parts):
            # a part is used by the script or by a part that comes after it
            text = "".join((LUA_DIR / f"{p}.lua").read_text() for p in (name, *parts[n + 1 :]))
            if part == "prelude":
                assert re.search(r"\bnow\b", text), name
            else:
                assert any(use in text for use in uses[part]), (name, part)


def test_the_down_load_is_the_same_in_lua_and_python() -> None:
    assert f"local DOWN_LOAD = {DOWN_LOAD}" in (LUA_DIR / "load_fn.lua").read_text()


# -- submit ------------------------------------------------------------------------------------


def test_a_submit_pushes_once_and_times_the_job_by_the_server(store: JobStore, client) -> None:
    message = submit(store, "s1")
    assert client.lrange("q", 0, -1) == [message]
    info = store.info("s1")
    server_now = client.time()[0]
    assert info["state"] == "queued" and info["delivery"] == "d1" and info["tag"] == "tag-d1"
    assert "msg" not in info  # the message is kept once, in the queue; the job hash keeps the job
    assert abs(float(info["enqueued_at"]) - server_now) < 5
    assert abs(int(info["pushed_at"]) / 1000 - server_now) < 5
    assert client.zscore(JOBS_INDEX, "s1") == float(info["enqueued_at"])
    # the same job id again (a producer retrying a submit whose reply it lost): nothing more
    again = build_message("s1", "q", {"job_id": "s1"}, delivery="other", delivery_tag="t9")
    assert not store.submit("s1", queue="q", message=again, tag="t9", delivery="other", body="{}")
    assert client.llen("q") == 1 and store.info("s1")["delivery"] == "d1"


# -- claim -------------------------------------------------------------------------------------


def test_a_claim_takes_lease_generation_and_slot_in_one_round_trip(store: JobStore, client) -> None:
    submit(store, "c1")
    warm = claimed(store, "warm", delivery="")  # loads the script, registers the daemons
    store.release(fence(warm, "warm"))
    client.calls.clear()
    got = claimed(store, "c1")
    assert client.calls == ["EVALSHA"]
    assert (got.gen, got.daemon, got.cancelled, got.attempt) == (1, D[0], False, 1)
    assert store.lease_holder("c1") == got.token
    assert load(client, D[0]) == 1 and load(client, D[1]) == 0
    assert abs(got.redis_now - client.time()[0]) < 5
    assert got.history.attempts == () and got.history.running is None
    info = store.info("c1")
    assert info["gen"] == "1" and info["holder"] == "host:1" and json.loads(info["running"])["daemon"] == D[0]
    assert (info["state"], info["daemon"], info["attempt"], info["slot"]) == ("running", D[0], "1", D[0])
    assert client.zscore(JOBS_INDEX, "c1") == -float(info["enqueued_at"])  # claimed: below zero


def test_a_build_that_starts_at_once_gets_its_export_lease_with_the_claim(store: JobStore, client) -> None:
    """The claim asks for the export lease (lua/export_fn.lua's take) only for a build that starts
    now: a slot, no cancel, no lost run to settle; its answer is the take's."""
    lease = export_lease_key("ck")
    submit(store, "e1")
    got = claimed(store, "e1", export_key="ck", limit=3)
    assert got.export == ("granted", None) and client.hget(lease, "job") == b"e1"
    assert client.ttl(lease) > 0
    later = float(client.hget(job_key("e1"), "enqueued_at")) + 100  # submitted later: newer than e1
    client.hset(job_key("e0"), "enqueued_at", repr(later))
    older = claimed(store, "e0", export_key="ck", limit=3)
    assert older.export == ("older", "e1")  # e1 holds it: wait for it, or skip
    assert client.hget(lease, "job") == b"e1"
    client.hset(job_key("e2"), "enqueued_at", "1.0")  # a build older than the holder
    assert claimed(store, "e2", export_key="ck", limit=3).export == ("newer", "e1")
    assert claimed(store, "plain", limit=3).export is None  # not asked: no export
    store.request_cancel("ec")
    assert claimed(store, "ec", export_key="ck2", limit=3).export is None  # cancelled: never starts
    assert client.exists(export_lease_key("ck2")) == 0
    full = claimed(store, "ef", export_key="ck3", limit=0)  # no slot: it waits before it starts
    assert full.daemon is None and full.export is None and client.exists(export_lease_key("ck3")) == 0
    first = claimed(store, "el", limit=3)
    expire_lease(client, "el")  # its worker died: the takeover settles the lost run first
    again = claimed(store, "el", export_key="ck4", limit=3)
    assert again.history.running is not None and again.export is None
    assert client.exists(export_lease_key("ck4")) == 0 and first.gen == 1


def test_a_finished_job_returns_its_record_and_touches_nothing(store: JobStore, client) -> None:
    client.hset(job_key("f"), "record", json.dumps({"job_id": "f", "state": "succeeded"}))
    assert claim(store, "f") == Finished({"job_id": "f", "state": "succeeded"})
    assert set(store.info("f")) == {"record"} and load(client, D[0]) == 0


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
    assert store.request_cancel("x")  # before its first claim: remembered
    got = claimed(store, "x")
    assert got.cancelled and got.daemon is None
    assert load(client, D[0]) == load(client, D[1]) == 0


def test_the_least_loaded_daemon_and_none_when_all_are_full(store: JobStore) -> None:
    assert claimed(store, "a").daemon == D[0]
    assert claimed(store, "b").daemon == D[1]
    full = claimed(store, "c")
    assert full.daemon is None and store.lease_holder("c") == full.token
    assert store.info("c")["state"] == "queued"  # claimed, but not running anywhere yet


def test_the_claim_finds_the_least_loaded_of_a_fleet_without_reading_every_daemon(
    store: JobStore, client
) -> None:
    fleet = [f"tcp://bk-{i:03d}:1" for i in range(300)]
    store.register_daemons(fleet)
    client.zadd(load_key(fleet), {d: 1 for d in fleet[:-1]})  # every daemon but the last runs a build

    def calls() -> int:
        return sum(v["calls"] for v in client.info("commandstats").values())

    before = calls()
    got = claimed(store, "big", daemons=fleet, limit=1)
    assert got.daemon == fleet[-1]
    assert calls() - before < 20  # the claim's own commands: a handful, not one per daemon


def test_a_claim_after_a_dead_holder_gets_its_run_and_domain(store: JobStore, client) -> None:
    first = claimed(store, "lost")
    expire_lease(client, "lost")  # its worker died
    assert load(client, first.daemon) == 1  # its slot still counts ...
    second = claimed(store, "lost", domain="dom-b")
    assert (second.gen, second.attempt) == (2, 2)  # the lost one was attempt 1
    assert second.history.running is not None and second.history.running["daemon"] == first.daemon
    assert second.history.previous_domain == "dom-a"
    # ... until the takeover gave it back (and took one of its own)
    assert load(client, D[0]) + load(client, D[1]) == 1


def test_the_claim_avoids_the_daemon_its_last_attempt_lost(store: JobStore) -> None:
    got = claimed(store, "av")
    assert got.daemon == D[0]
    assert requeue(store, fence(got, "av"), avoid=D[0])
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
    client.set(AFFINITY_PREFIX + "elsewhere", "tcp://not-mine:1")  # not one of this worker's daemons
    assert claimed(store, "af4", cache_key="elsewhere", limit=2).preferred is None


# -- the holder's steps and their fences -------------------------------------------------------


def lease_until(client: Any, job_id: str) -> float:
    return float(client.hget(job_key(job_id), "lease_until")) / 1000


def test_renewal_extends_the_lease_each_time_and_writes_the_phase(store: JobStore, client) -> None:
    got = claimed(store, "rn", ttl_s=0.5)
    f = fence(got, "rn")
    for phase in ("build", "push", ""):  # every renewal extends it again (not only the first)
        expire_lease(client, "rn")
        assert store.renew(f, ttl_s=5, phase=phase) == "ok"
        assert lease_until(client, "rn") > client.time()[0] + 4
    assert store.info("rn")["phase"] == "push"  # '' leaves the phase as it is
    assert load(client, got.daemon) == 1  # the slot is the claim's until it ends: nothing to renew


def test_renewal_retakes_an_expired_lease_only_while_nobody_claimed_since(store: JobStore, client) -> None:
    got = claimed(store, "gen")
    f = fence(got, "gen")
    expire_lease(client, "gen")
    assert store.renew(f, ttl_s=5) == "ok"  # same generation: still ours
    expire_lease(client, "gen")
    newer = claimed(store, "gen", domain="dom-b")  # a takeover: generation 2
    expire_lease(client, "gen")  # even with the lease free again, the old holder is out for good
    assert store.renew(f, ttl_s=5, phase="build") == "fenced"
    assert store.lease_holder("gen") is None and store.info("gen").get("phase") == "launch"
    assert store.renew(fence(newer, "gen"), ttl_s=5) == "ok"


def test_renewal_never_brings_back_a_job_that_is_gone(store: JobStore, client) -> None:
    got = claimed(store, "gone")
    client.delete(job_key("gone"))  # expired, or deleted by an operator
    assert store.renew(fence(got, "gone"), ttl_s=5, phase="build") == "fenced"
    assert client.exists(job_key("gone")) == 0


def test_renewal_reports_a_cancel(store: JobStore, client) -> None:
    got = claimed(store, "cn")
    assert store.request_cancel("cn")
    assert store.renew(fence(got, "cn"), ttl_s=5) == "cancel"


def test_a_cancel_sets_the_flag_and_tells_the_workers(store: JobStore, client) -> None:
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(CANCELS_CHANNEL)
    pubsub.get_message(timeout=1)  # the subscription's confirmation
    assert store.request_cancel("cc")
    message = pubsub.get_message(timeout=2)
    pubsub.close()
    assert message is not None and message["data"] == b"cc"
    assert store.cancel_requested("cc")
    assert 0 < client.ttl(job_key("cc")) <= 60  # a job never seen: the flag expires with the result TTL


def test_a_cancel_leaves_a_finished_job_alone(store: JobStore, client) -> None:
    got = claimed(store, "done")
    assert finish(store, fence(got, "done"))
    assert not store.request_cancel("done")
    assert not store.cancel_requested("done")


def test_a_requeue_publishes_the_next_message_and_gives_the_claim_back(store: JobStore, client) -> None:
    submit(store, "rq")
    got = claimed(store, "rq")
    f = fence(got, "rq")
    assert requeue(store, f, avoid=D[0], waiting_since=7.5)
    assert client.lrange("q", 0, 0) == [b"next"]
    info = store.info("rq")
    fields = ("state", "phase", "delivery", "tag", "avoid", "waiting_since")
    assert [info[f] for f in fields] == ["queued", "retry_wait", "d2", "t2", D[0], "7.5"]
    assert json.loads(info["attempts"]) == [{"number": 1}] and "running" not in info and "lease" not in info
    assert store.lease_holder("rq") is None and load(client, D[0]) == 0 and info["slot"] == ""
    assert client.zscore(JOBS_INDEX, "rq") == float(info["enqueued_at"])  # queued again: above zero
    assert abs(int(info["pushed_at"]) / 1000 - client.time()[0]) < 5


def test_a_requeue_by_a_holder_that_lost_its_claim_publishes_nothing(store: JobStore, client) -> None:
    submit(store, "rf")
    old = claimed(store, "rf")
    expire_lease(client, "rf")
    newer = claimed(store, "rf", domain="dom-b")  # generation 2 holds it now
    before = client.llen("q")
    assert not requeue(store, fence(old, "rf"))
    assert client.llen("q") == before and store.info("rf")["delivery"] == "d1"
    assert load(client, newer.daemon) == 1  # the new holder's slot is untouched


def test_finish_stores_everything_in_one_round_trip(store: JobStore, client) -> None:
    submit(store, "fi")
    got = claimed(store, "fi")
    other = claimed(store, "fi2")  # holds the other daemon's slot: must keep it
    finish(store, fence(claimed(store, "warm", limit=3), "warm"), state="failed")  # loads the script
    pubsub = client.pubsub()
    pubsub.subscribe(job_keys("fi").done)
    client.calls.clear()
    end = LogEnd(attempt=1, lines="r#1 DONE 0.1s\nefinal: succeeded", maxlen=100, ttl_s=50)
    assert finish(store, fence(got, "fi"), log=end)
    assert client.calls == ["EVALSHA"]
    assert store.result("fi") == {"job_id": "fi", "state": "succeeded"}
    info = store.info("fi")
    assert (info["state"], info["phase"], info["done_gen"]) == ("succeeded", "done", "1")
    stream = client.xrange(job_keys("fi").log)
    assert [(int(f[b"a"]), decode_lines(f[b"l"].decode())) for _, f in stream] == [
        (1, [("raw", "#1 DONE 0.1s"), ("end", "final: succeeded")])
    ]
    assert 0 < client.ttl(job_keys("fi").log) <= 50
    assert store.lease_holder("fi") is None
    assert client.zscore(JOBS_INDEX, "fi") == float(info["enqueued_at"]) + final_band("succeeded")
    assert load(client, got.daemon) == 0 and load(client, other.daemon) == 1
    messages = [m for m in iter(lambda: pubsub.get_message(timeout=1), None) if m["type"] == "message"]
    pubsub.close()
    assert [json.loads(m["data"]) for m in messages] == [store.result("fi")]  # the record itself


def test_a_waiter_takes_the_record_from_the_done_message(store: JobStore, client) -> None:
    """The done message is the record (finish.lua, reject.lua): a producer that heard it reads
    nothing more; a state word (a worker of an earlier version) still makes it read the hash."""
    import threading

    submit(store, "wm")
    got = claimed(store, "wm")
    assert store.wait_result("warm-up", timeout=0.01) is None
    threading.Timer(0.3, lambda: finish(store, fence(got, "wm"))).start()
    client.calls.clear()
    assert store.wait_result("wm", timeout=5) == {"job_id": "wm", "state": "succeeded"}
    assert client.calls.count("HGET") == 1  # the read on the confirmation, none after the message

    def an_older_worker_ends_it() -> None:
        client.hset(job_key("wo"), "record", json.dumps({"job_id": "wo", "state": "failed"}))
        client.publish(job_keys("wo").done, "failed")

    threading.Timer(0.3, an_older_worker_ends_it).start()
    client.calls.clear()
    assert store.wait_result("wo", timeout=5) == {"job_id": "wo", "state": "failed"}
    assert client.calls.count("HGET") == 2


def test_a_finish_trims_an_archived_log_to_its_tail(store: JobStore, client) -> None:
    got = claimed(store, "tl")
    for i in range(10):
        client.xadd(job_keys("tl").log, {"a": 1, "l": f"rline {i}"})
    end = LogEnd(attempt=1, lines="efinal: succeeded", maxlen=3, exact=True)
    assert finish(store, fence(got, "tl"), log=end)
    assert client.xlen(job_keys("tl").log) == 3


def test_a_finish_by_a_holder_that_lost_its_claim_writes_nothing(store: JobStore, client) -> None:
    old = claimed(store, "ff")
    expire_lease(client, "ff")
    new = claimed(store, "ff", domain="dom-b")
    assert not finish(store, fence(old, "ff"), state="failed", log=LogEnd(1, "mx", 10, False, 10))
    assert store.result("ff") is None and client.exists(job_keys("ff").log) == 0
    assert store.lease_holder("ff") == new.token and load(client, new.daemon) == 1
    assert finish(store, fence(new, "ff"))
    assert load(client, new.daemon) == 0
    # the same claim again (its reply was lost and it tries again): stored already, nothing rewritten
    assert finish(store, fence(new, "ff"), state="failed")
    assert store.result("ff") == {"job_id": "ff", "state": "succeeded"}
    assert load(client, D[0]) == load(client, D[1]) == 0  # and the slot was given back once


def test_only_a_success_is_remembered_for_the_cache_and_joins_the_baseline(store: JobStore, client) -> None:
    base = (BASELINE_PREFIX + "repo:cache", b'{"p":{}}', 5, 100)
    failed = claimed(store, "m1")
    assert finish(store, fence(failed, "m1"), state="failed", remember=("repo:cache", failed.daemon),
                  baseline=base)  # fmt: skip
    assert client.get(AFFINITY_PREFIX + "repo:cache") is None
    assert client.llen(BASELINE_PREFIX + "repo:cache") == 0
    ok = claimed(store, "m2")
    assert finish(store, fence(ok, "m2"), remember=("repo:cache", ok.daemon), baseline=base)
    assert client.get(AFFINITY_PREFIX + "repo:cache") == ok.daemon.encode()
    assert client.lrange(BASELINE_PREFIX + "repo:cache", 0, -1) == [b'{"p":{}}']


def test_a_baseline_keeps_between_n_and_2n_entries(store: JobStore, client) -> None:
    key = BASELINE_PREFIX + "repo:trim"
    for i in range(12):
        got = claimed(store, f"b{i}", limit=20)
        assert finish(store, fence(got, f"b{i}"), baseline=(key, str(i).encode(), 5, 100))
    # trimmed to 5 when it passed 10 (at the 11th), then one more
    assert client.lrange(key, 0, -1) == [b"11", b"10", b"9", b"8", b"7", b"6"]
    assert 0 < client.ttl(key) <= 100


def test_release_gives_back_only_what_is_ours_and_keeps_the_error(store: JobStore, client) -> None:
    got = claimed(store, "rl")
    assert store.release(fence(got, "rl"), error="OSError: disk full")
    assert store.lease_holder("rl") is None and load(client, D[0]) == 0
    assert json.loads(store.info("rl")["running"])["error"] == "OSError: disk full"
    again = claimed(store, "rl")
    assert not store.release(fence(got, "rl"))  # generation 1 is not the holder now
    assert store.lease_holder("rl") == again.token and load(client, again.daemon) == 1


def test_take_slot_honours_the_daemon_to_avoid(store: JobStore, client) -> None:
    f = fence(claimed(store, "ts", limit=0), "ts")  # claimed with no room anywhere
    assert store.take_slot(f, D, limit=2, attempt=1, worker="w", avoid=D[0]) == D[1]
    g = fence(claimed(store, "ts2", limit=0), "ts2")
    assert store.take_slot(g, D, limit=1, attempt=1, worker="w", avoid=D[0]) == D[0]  # no other has room
    assert store.info("ts2")["state"] == "running" and store.info("ts2")["daemon"] == D[0]
    h = fence(claimed(store, "ts3", limit=0), "ts3")
    assert store.take_slot(h, D, limit=1, attempt=1, worker="w") is None  # all full
    assert store.take_slot(h, D, limit=3, attempt=1, worker="w", only=D[0]) == D[0]
    assert load(client, D[0]) == 2 and load(client, D[1]) == 1


def test_take_slot_grants_nothing_to_a_holder_that_lost_its_claim(store: JobStore, client) -> None:
    old = fence(claimed(store, "tso", limit=0), "tso")
    expire_lease(client, "tso")
    claimed(store, "tso", limit=0)
    assert store.take_slot(old, D, limit=2, attempt=1, worker="w") is None
    assert load(client, D[0]) == load(client, D[1]) == 0


def test_a_down_daemon_is_never_the_least_loaded(store: JobStore, client) -> None:
    from buildq.store.daemons import DaemonHealth

    health = DaemonHealth(client)
    store.register_daemons(D)
    assert health.mark_down(D[0], "refused", 1.0)
    assert load(client, D[0]) == DOWN_LOAD
    assert claimed(store, "dn1", limit=2).daemon == D[1]
    assert claimed(store, "dn2", limit=2).daemon == D[1]
    assert claimed(store, "dn3", limit=2).daemon is None  # D[1] full, D[0] down
    assert not health.mark_down(D[0], "refused", 2.0)  # already open: moved once
    assert health.mark_up(D[0], 3.0) == 2.0
    assert load(client, D[0]) == 0
    assert claimed(store, "dn4", limit=2).daemon == D[0]


def test_a_load_index_that_lost_a_breaker_is_corrected(store: JobStore, client) -> None:
    from buildq.store.keys import DAEMONS_DOWN

    store.register_daemons(D)
    client.hset(DAEMONS_DOWN, D[1], "1")  # opened while the index was gone, say
    assert load(client, D[1]) == 0
    store.register_daemons(D, again=True)
    assert load(client, D[1]) == DOWN_LOAD
    client.delete(load_key(D))  # a Redis that lost it: the claim registers it again
    assert claimed(store, "again-idx").daemon == D[0]


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


def test_a_record_stored_before_the_subscription_took_effect_is_found(store: JobStore, client) -> None:
    """A read sent before Redis acts on the SUBSCRIBE (two connections) can be served first, and
    the done message published in between is never delivered: the wait reads only once Redis
    confirms the subscription (a producer waiting behind a busy worker lost up to RECHECK_S, 10 s,
    a build to this race). Here the SUBSCRIBE takes effect 0.3 s late and the job ends at 0.1 s."""
    import threading

    from buildq.store.jobs import RECHECK_S

    record = json.dumps({"job_id": "race", "state": "succeeded"})
    pubsub = store._subscriber()
    subscribe = pubsub.subscribe

    def late(*channels: Any) -> None:
        threading.Timer(0.3, subscribe, args=channels).start()

    def the_job_ends() -> None:
        client.hset(job_key("race"), "record", record)
        client.publish(job_keys("race").done, "succeeded")  # nobody subscribed yet: lost

    pubsub.subscribe = late
    threading.Timer(0.1, the_job_ends).start()
    try:
        assert store.wait_result("race", timeout=RECHECK_S / 4) == {"job_id": "race", "state": "succeeded"}
    finally:
        pubsub.subscribe = subscribe
    assert store.wait_result("race-2", timeout=0.05) is None  # the held subscriber still works


def test_scripts_run_by_their_own_sha_and_a_pool_process_preloads_them(store: JobStore, client) -> None:
    """EVALSHA names a script by the SHA1 of its source, so no process loads a script Redis has;
    one Redis lost (SCRIPT FLUSH: a restart, a new master) is loaded where first run; preload
    loads every script in one round trip."""
    names = script_names()
    assert "claim" in names and "finish" in names and "job_fn" not in names
    client.script_flush()
    client.calls.clear()
    submit(store, "sh")  # not in Redis: NOSCRIPT, loaded, run
    assert client.calls == ["EVALSHA", "SCRIPT LOAD", "EVALSHA"]
    client.calls.clear()
    submit(store, "sh2")
    assert client.calls == ["EVALSHA"]
    client.script_flush()
    store.scripts.preload()
    assert client.script_exists(*(script(n).sha for n in names)) == [True] * len(names)
    client.calls.clear()
    assert isinstance(claim(store, "sh"), Claimed) and set(client.calls) == {"EVALSHA"}  # no load


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


def test_the_last_write_gives_back_the_export_lease_in_its_round_trip(store: JobStore, client) -> None:
    """finish and requeue give back the export lease the build held (lua/export_fn.lua), fenced by
    the lease's holder: another build's lease is left alone; ``exported`` makes it the newest done."""
    lease = export_lease_key("ck")
    got = claimed(store, "xf")
    assert store.take_export("ck", job_id="xf", order=100.0, ttl_s=30)[0] == "granted"
    finish(store, fence(claimed(store, "warm", limit=3), "warm"), state="failed")  # loads the script
    client.calls.clear()
    assert finish(store, fence(got, "xf", "ck"), export=ExportRelease(100.0, exported=True))
    assert client.calls == ["EVALSHA"]  # the record and the lease, one round trip
    assert client.hmget(lease, "until", "done_order", "done_job") == [b"0", b"100.0", b"xf"]  # given back
    assert store.take_export("ck", job_id="older", order=50.0, ttl_s=30)[0] == "newer"
    assert not store.release_export("ck", job_id="xf", order=100.0, exported=True)  # once only

    held = claimed(store, "xr")
    assert store.take_export("ck", job_id="xr", order=200.0, ttl_s=30)[0] == "granted"
    assert requeue(store, fence(held, "xr", "ck"), export=ExportRelease(200.0))
    assert client.hmget(lease, "until", "done_job") == [b"0", b"xf"]  # free; a retry exported nothing
    assert store.take_export("ck", job_id="xr", order=200.0, ttl_s=30)[0] == "granted"  # a take again
    client.hset(lease, "until", 1)  # lapsed: its holder takes it again as any build would
    assert store.take_export("ck", job_id="ya", order=210.0, ttl_s=30)[0] == "granted"
    assert store.take_export("ck", job_id="xr", order=200.0, ttl_s=30) == ("newer", "ya")
    assert store.release_export("ck", job_id="ya", order=210.0, exported=False)
    client.hset(lease, mapping={"done_order": 220.0, "done_job": "zz"})  # given back, then a newer export
    assert store.take_export("ck", job_id="ya", order=210.0, ttl_s=30) == ("newer", "zz")  # not a renewal

    assert store.take_export("ck", job_id="holder", order=300.0, ttl_s=30)[0] == "granted"
    other = claimed(store, "xo")
    assert finish(store, fence(other, "xo", "ck"), export=ExportRelease(250.0, exported=True))
    assert client.hmget(lease, "job", "done_job") == [b"holder", b"zz"]  # not its lease: untouched
