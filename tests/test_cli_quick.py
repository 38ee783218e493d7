"""``buildq status`` answered without typer, pydantic or redis-py: the same answer as the full
path, and the full path whenever the quick one cannot be sure."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from buildq.cli import quick
from buildq.config import ENV_PREFIX, Settings
from tests.conftest import scenario
from tests.harness import ROOT, clean_environ, client_for, free_port, run_cli

HEAVY = ("typer", "pydantic", "pydantic_settings", "redis", "celery", "kombu")

#: runs ``buildq ARGS`` in-process and reports, on its last stderr line, the heavy packages loaded
PROBE = """
import atexit, json, sys
atexit.register(lambda: print("LOADED " + json.dumps(sorted({m.split(".")[0] for m in sys.modules}
                                                          & set(%r))), file=sys.stderr))
sys.argv = ["buildq", *sys.argv[1:]]
from buildq.cli import main
main()
""" % (HEAVY,)  # noqa: UP031 - a literal tuple in the code


def _probe(env: dict[str, str], *args: str) -> tuple[int, Any, list[str]]:
    full = {**clean_environ("BUILDQ_"), **env}
    done = subprocess.run([sys.executable, "-c", PROBE, *args], env=full, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    loaded = json.loads(lines[-1].removeprefix("LOADED "))
    out = json.loads(done.stdout) if done.stdout.strip() else None
    return done.returncode, out, loaded


def test_the_known_settings_are_the_settings() -> None:
    assert {ENV_PREFIX + name.upper() for name in Settings.model_fields} == quick.KNOWN_SETTINGS


def test_status_answers_as_the_full_path_without_the_heavy_imports(
    buildq_env, start_worker, context_dir
) -> None:
    start_worker(buildq_env)
    client = client_for(buildq_env)
    ok = client.submit({"context": str(context_dir), "tags": ["reg/quick:1"]})
    failing = {"STANDIN_SCENARIO": scenario(kind="fail", error="failed to solve: no")}
    bad = client.submit({"context": str(context_dir), "tags": ["reg/quick:2"], "build_args": failing})
    assert ok.wait(timeout=60)["state"] == "succeeded" and bad.wait(timeout=60)["state"] == "failed"
    waiting = client_for({**buildq_env, "BUILDQ_QUEUE": "nobody-reads-this"}).submit(
        {"context": str(context_dir), "tags": ["reg/quick:3"]}
    )
    # the first command with settings never seen validates them (the full path), leaving its mark;
    # the next one is quick (the worker's own start left the mark of buildq_env)
    changed = {**buildq_env, "BUILDQ_REDIS_RETRY_S": "7"}
    (rc1, _, full), (rc2, _, fast) = (_probe(changed, "status", "never-seen") for _ in range(2))
    assert rc1 == rc2 == 1 and {"pydantic", "typer"} <= set(full) and fast == []
    for job_id, code in ((ok.job_id, 0), (bad.job_id, 1), (waiting.job_id, 0), ("never-seen", 1)):
        rc, shown, loaded = _probe(buildq_env, "status", job_id, "--json")
        assert rc == code and loaded == [], (job_id, rc, loaded)
        assert shown == client.status(job_id)  # what the full path's client reads
    # the terminal view too (rendered by the same code as the full path)
    view = run_cli(buildq_env, "status", ok.job_id)
    assert view.returncode == 0 and "succeeded" in view.stdout and "reg/quick:1" in view.stdout


def test_anything_the_quick_path_cannot_be_sure_of_takes_the_full_path(buildq_env, tmp_path) -> None:
    def marked(env: dict[str, str]) -> dict[str, str]:
        env = {**env, "XDG_CACHE_HOME": str(tmp_path / "cache")}
        quick.remember_valid(env)  # as if validated: each None below is for its own reason
        return env

    buildq_env = marked(buildq_env)
    assert quick.run(["status", "never-seen"], buildq_env) == 1  # the quick path, for contrast
    unmarked = {**buildq_env, "BUILDQ_QUEUE": "changed"}  # settings the full path never saw
    assert quick.run(["status", "never-seen"], unmarked) is None
    assert quick.run(["status", "x"], marked({**buildq_env, "BUILDQ_NOT_A_SETTING": "1"})) is None
    assert quick.run(["status", "x", "--wait"], buildq_env) is None
    assert quick.run(["list"], buildq_env) is None
    sentinel = {**buildq_env, "BUILDQ_BROKER_URL": "sentinel://127.0.0.1:1/0", "BUILDQ_SENTINEL_MASTER": "m"}
    assert quick.run(["status", "x"], marked(sentinel)) is None
    away = {**buildq_env, "BUILDQ_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    assert quick.run(["status", "x"], marked(away)) is None
    archived = {**buildq_env, "BUILDQ_ARCHIVE_DIR": str(tmp_path / "archive")}
    assert quick.run(["status", "only-in-the-archive"], marked(archived)) is None
    # and the full path says what is wrong, on one line, with its exit code, every time
    for bad in ({"BUILDQ_NOT_A_SETTING": "1"}, {"BUILDQ_LAUNCHER": "k8s"}):
        for _ in range(2):
            rc, _, loaded = _probe({**buildq_env, **bad}, "status", "x")
            assert rc == 2 and "pydantic" in loaded
        done = run_cli({**buildq_env, **bad}, "status", "x")
        assert next(iter(bad)) in done.stderr and len(done.stderr.strip().splitlines()) == 1
