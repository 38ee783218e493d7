"""Issue 26 against genuine buildctl/buildkitd v0.21.0 (opt-in: ``buildkit`` marker): a granted secret
printed by a RUN step across a 16 KiB output line, a git context's URL userinfo in BuildKit's own
texts, and a RUN step printing without end under ``BUILDQ_LOG_MAX_BYTES``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from buildq.store.keys import log_key
from tests.genuine import bin_dir
from tests.harness import client_for, free_port
from tests.harness import run_cli as cli
from tests.test_buildkit_genuine import deployment, genuine  # noqa: F401 - fixture

pytestmark = [
    pytest.mark.buildkit,
    pytest.mark.skipif(bin_dir() is None, reason="BUILDQ_TEST_BUILDKIT_BIN is not set (genuine BuildKit)"),
    pytest.mark.timeout(600),
]

SECRET = "npm-Gr4nted-T0ken-51f0a9"


def context(tmp_path: Path, base: str, run: str) -> Path:
    ctx = tmp_path / "project"
    ctx.mkdir(parents=True)
    (ctx / "Dockerfile").write_text(f"FROM {base}\n{run}\n")
    return ctx


def everything(env: dict[str, str], record: dict) -> str:
    job_id = record["job_id"]
    return json.dumps(record) + cli(env, "logs", job_id).stdout + cli(env, "logs", job_id, "--raw").stdout


def test_a_granted_secret_printed_across_a_long_line_is_masked(genuine, tmp_path, start_worker) -> None:  # noqa: F811
    env = {**deployment(genuine, tmp_path, 4), "BUILDQ_SECRET_ENV": "BUILD_SECRET_*"}
    start_worker({**env, "BUILD_SECRET_NPM": SECRET}, concurrency=1)
    # the secret printed in two writes a second apart (two log entries): the first ends past 16 KiB,
    # where the worker releases the held line
    for pad in (16376, 16380, 16384):
        run = (
            "RUN --mount=type=secret,id=npm sh -c 'head -c "
            f'{pad} /dev/zero | tr "\\0" x; head -c 12 /run/secrets/npm; sleep 1; '
            'tail -c +13 /run/secrets/npm; echo " and more"; exit 3\''
        )
        ctx = context(tmp_path / str(pad), genuine["base"], run)
        job = {"context": str(ctx), "tags": [f"{genuine['registry'].host}/demo/secret:{pad}"],
               "secrets": [{"id": "npm", "env": "BUILD_SECRET_NPM"}]}  # fmt: skip
        record = client_for(env).submit(job).wait(timeout=300)
        assert record["state"] == "failed" and record["error"]["kind"] == "permanent", record["error"]
        shown = everything(env, record)
        assert SECRET[:12] not in shown and SECRET[12:] not in shown  # not even piece by piece
        assert "***" in cli(env, "logs", record["job_id"]).stdout  # masked whole (the view may cut after it)


def test_a_git_contexts_userinfo_never_shows(genuine, tmp_path, start_worker) -> None:  # noqa: F811
    env = deployment(genuine, tmp_path, 6)
    start_worker(env, concurrency=1)
    token = "ghp-Us3rInfo-T0ken-2b7c"
    url = f"https://builder:{token}@127.0.0.1:{free_port()}/team/app.git#main"
    job = {"context": url, "tags": [f"{genuine['registry'].host}/demo/git:1"]}
    record = client_for(env).submit(job).wait(timeout=300)
    assert record["state"] == "failed", record
    shown = everything(env, record)
    assert token not in shown, shown[-2000:]
    print(f"\ngenuine git error: {record['error']['message']}")


def test_a_step_printing_without_end_is_capped(genuine, tmp_path, start_worker) -> None:  # noqa: F811
    env = {**deployment(genuine, tmp_path, 8), "BUILDQ_LOG_MAX_BYTES": "200000"}
    start_worker(env, concurrency=1)
    ctx = context(tmp_path, genuine["base"], "RUN yes buildq | head -c 5000000")
    job = {"context": str(ctx), "tags": [f"{genuine['registry'].host}/demo/loud:1"]}
    record = client_for(env).submit(job).wait(timeout=300)
    assert record["state"] == "succeeded", record.get("error")
    r = redis.Redis.from_url(env["BUILDQ_BROKER_URL"])
    stored = sum(len(v) for _, fields in r.xrange(log_key(record["job_id"])) for v in fields.values())
    raw = cli(env, "logs", record["job_id"], "--raw").stdout
    assert "passed 200000 bytes (BUILDQ_LOG_MAX_BYTES)" in raw
    assert stored < 200000 + 20000, stored
    print(f"\ngenuine loud step: {stored} bytes stored of a 5,000,000-byte output")
