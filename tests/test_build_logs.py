"""Build logs: readable while the build runs, kept after it ends, redacted (real worker, real Redis)."""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from pathlib import Path

from tests.conftest import FIXTURES, scenario
from tests.harness import client_for, wait_until
from tests.harness import run_cli as cli

SECRET = "s3cr3t-Npm-T0ken-4242"


def step_lines(lines: list[str]) -> list[str]:
    """Step headers (the first line of each #N), CACHED / DONE / ERROR markers and step output,
    with durations, output offsets and digests normalised (they differ between two runs)."""
    keep, seen = [], set()
    for line in lines:
        match = re.match(r"^(#\d+) (.*)$", line)
        if not match:
            continue
        number, body = match.groups()
        is_header = number not in seen
        seen.add(number)
        is_marker = body == "CACHED" or body.startswith(("DONE ", "ERROR"))
        is_output = re.match(r"^\d+\.\d+ ", body) is not None
        if is_header or is_marker or is_output:
            line = re.sub(r"\d+\.\d+s", "Ns", line)
            line = re.sub(r"^(#\d+) \d+\.\d+ ", r"\1 T ", line)
            keep.append(re.sub(r"sha256:[0-9a-f]{64}", "sha256:X", line))
    return keep


def test_stored_log_matches_the_genuine_plain_capture(buildq_env, start_worker, context_dir):
    start_worker(buildq_env)
    client = client_for(buildq_env)
    for capture in ("ctx_oci_rawjson_cold", "ctx_oci_rawjson_warm", "extra_cachemetrics_trace_cold"):
        handle = client.submit(
            {
                "context": str(context_dir),
                "tags": ["reg/logs:1"],
                "build_args": {"STANDIN_SCENARIO": scenario(kind="succeed", capture=capture)},
            }
        )
        assert handle.wait(timeout=60)["state"] == "succeeded"
        out = cli(buildq_env, "logs", handle.job_id)
        assert out.returncode == 0, out.stderr
        if capture.startswith("extra_"):
            genuine = (FIXTURES / "extra" / f"{capture}.stderr").read_text().splitlines()
        else:
            genuine = (FIXTURES / "builds" / f"{capture.replace('_rawjson_', '_plain_')}.stderr").read_text()
            genuine = genuine.splitlines()
        assert step_lines(out.stdout.splitlines()) == step_lines(genuine), capture
        raw = cli(buildq_env, "logs", handle.job_id, "--raw").stdout.splitlines()
        assert sum(1 for line in raw if line.startswith("{")) > 20


def test_follow_sees_lines_before_the_build_ends_and_exits_with_its_outcome(
    buildq_env, start_worker, context_dir
):
    start_worker(buildq_env)
    client = client_for(buildq_env)
    handle = client.submit(
        {
            "context": str(context_dir),
            "tags": ["reg/follow:1"],
            # a pause longer than a flush period (FLUSH_EVERY_S): the lines before it arrive first
            "build_args": {"STANDIN_SCENARIO": scenario(kind="succeed", sleep_s=4.0)},
        }
    )
    seen: list[tuple[float, str]] = []

    def follow() -> None:
        for entry in handle.follow_logs():
            seen.append((time.time(), entry.line))

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    record = handle.wait(timeout=60)
    reader.join(10)
    assert not reader.is_alive()  # follow ended by itself after the final mark
    finished = datetime_ts(record["finished_at"])
    early = [line for t, line in seen if t < finished - 1.0]
    assert any(line.startswith("#1 [internal] load build definition") for line in early)
    assert seen[-1][1] == "final: succeeded"
    # the CLI follows too and exits with the build's outcome
    failing = client.submit(
        {
            "context": str(context_dir),
            "tags": ["reg/follow:2"],
            "build_args": {
                "STANDIN_SCENARIO": scenario(
                    kind="fail", error="failed to solve: dockerfile parse error", sleep_s=1
                )
            },
        }
    )
    out = cli(buildq_env, "logs", failing.job_id, "--follow")
    assert out.returncode == 1
    assert "error: failed to solve: dockerfile parse error" in out.stdout
    assert out.stdout.rstrip().endswith("final: failed ---")


def datetime_ts(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


def test_follow_across_retries_marks_each_attempt(buildq_env, start_worker, context_dir, tmp_path):
    start_worker(buildq_env)
    sc = scenario(kind="flaky", state_dir=str(tmp_path / "st"), fail_first=1)
    handle = client_for(buildq_env).submit(
        {"context": str(context_dir), "tags": ["reg/retry-log:1"], "build_args": {"STANDIN_SCENARIO": sc}}
    )
    out = cli(buildq_env, "logs", handle.job_id, "-f")
    assert out.returncode == 0
    text = out.stdout
    assert "--- attempt 1: attempt 1 started" in text
    assert "retrying in" in text
    assert "--- attempt 2: attempt 2 started" in text
    assert text.index("attempt 1 started") < text.index("retrying in") < text.index("attempt 2 started")


def planted_capture(tmp_path: Path) -> Path:
    """The extra capture with the secret printed by its RUN step (split across two log entries)."""
    lines = (FIXTURES / "extra" / "extra_cachemetrics_trace_cold.trace.json").read_text().splitlines()
    out = []
    planted = False
    for line in lines:
        obj = json.loads(line)
        if not planted and obj.get("logs"):
            log = obj["logs"][0]
            half = len(SECRET) // 2
            first = dict(log, data=base64.b64encode(f"npm token {SECRET[:half]}".encode()).decode())
            rest = f"{SECRET[half:]} in use\n".encode() + base64.b64decode(log["data"])
            second = dict(log, data=base64.b64encode(rest).decode())
            obj["logs"] = [first, second, *obj["logs"][1:]]
            planted = True
        out.append(json.dumps(obj))
    path = tmp_path / "planted.trace.json"
    path.write_text("\n".join(out) + "\n")
    return path


def test_failed_build_carries_the_step_output_tail_and_secrets_are_redacted(
    buildq_env, start_worker, context_dir, tmp_path
):
    env = {**buildq_env, "NPM_TOKEN": SECRET, "BUILDQ_SECRET_ENV": "NPM_TOKEN"}
    start_worker(env)
    capture = planted_capture(tmp_path)
    error = (
        'failed to solve: process "/bin/sh -c ls -la /out && cat /out/built.txt" did not complete '
        "successfully: exit code: 1"
    )
    job = {
        "context": str(context_dir),
        "tags": ["reg/secret:1"],
        "secrets": [{"id": "npm", "env": "NPM_TOKEN"}],
        "build_args": {
            "STANDIN_SCENARIO": scenario(kind="fail", capture=str(capture), after_lines=10_000, error=error)
        },
    }
    record = client_for(env).submit(job).wait(timeout=60)
    assert record["state"] == "failed" and record["error"]["reason"] == "step_failed"
    tail = record["error"]["log_tail"]
    assert any("npm token ***" in line for line in tail)
    assert any("random.bin" in line for line in tail)  # the RUN step's own output, not only buildctl's
    plain = cli(env, "logs", record["job_id"]).stdout
    raw = cli(env, "logs", record["job_id"], "--raw").stdout
    everything = json.dumps(record) + plain + raw
    assert SECRET not in everything
    for line in raw.splitlines():
        if line.startswith("{"):
            for log in json.loads(line).get("logs") or []:
                assert SECRET not in base64.b64decode(log["data"]).decode(errors="replace")
    assert "npm token ***" in plain


def test_log_stream_cap_and_ttl(buildq_env, start_worker, context_dir):
    import redis

    env = {**buildq_env, "BUILDQ_LOG_STREAM_MAXLEN": "100", "BUILDQ_LOG_STREAM_TTL_S": "300"}
    start_worker(env)
    handle = client_for(env).submit(
        {
            "context": str(context_dir),
            "tags": ["reg/cap:1"],
            "build_args": {
                "STANDIN_SCENARIO": scenario(kind="succeed", capture="extra_cachemetrics_trace_cold")
            },
        }
    )
    assert handle.wait(timeout=60)["state"] == "succeeded"
    r = redis.Redis.from_url(env["BUILDQ_BROKER_URL"])
    key = f"buildq:log:{handle.job_id}"
    assert r.xlen(key) <= 200  # approximate trimming: never far above the cap
    assert 0 < r.ttl(key) <= 300
    wait_until(lambda: r.xlen(key) > 0, timeout=1)
