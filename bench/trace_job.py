"""Which modules one real job passes through on the worker, traced at run time.

Run by hand (not part of the tests):
    .venv/bin/python bench/trace_job.py [--tree PATH]

It starts a ``redis-server`` of its own, a real ``buildq worker`` (prefork, one pool process,
local launcher, the buildctl stand-in replaying a genuine capture) whose pool process profiles
the task (``sys.setprofile`` from ``task_prerun`` to ``task_postrun``), submits one job and
prints what the task's thread did:

- **modules entered**: distinct ``buildq.*`` modules with at least one call, out of the package's;
- after buildctl exits (the return of the launcher's ``wait``):
  - **stays**: runs of consecutive profile events in one module (a call out and back makes two);
  - **returns to a module already left**: calls into a ``buildq`` module that was entered after the
    exit, whose frames have all returned since, and that is not on the stack (a module called again
    once control went elsewhere; a callee returning to its caller is not one).

``--tree`` measures another checkout (its own ``buildq`` package) with this script, so two trees
are compared by the same rules.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# The pool-process side: installed by the worker wrapper below (``python -c``), kept as text so
# the measured tree needs nothing of this script.
WRAPPER = r"""
import json, os, sys, threading
from celery.signals import task_prerun, task_postrun
OUT = os.environ["TRACE_OUT"]
events = []          # (kind, module, function)
stack_mods = []

def prof(frame, event, arg):
    if event not in ("call", "return"):
        return
    mod = frame.f_globals.get("__name__", "")
    events.append((event, mod, frame.f_code.co_name))

def start(**_):
    events.clear()
    sys.setprofile(prof)

def stop(**_):
    sys.setprofile(None)
    with open(OUT, "w") as fh:
        json.dump(events, fh)

task_prerun.connect(start, weak=False)
task_postrun.connect(stop, weak=False)
from buildq.cli import main
sys.argv = ["buildq"] + sys.argv[1:]
main()
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def analyse(events: list[list[str]], package_modules: int) -> dict[str, object]:
    calls = [(m, f) for kind, m, f in events if kind == "call" and m.startswith("buildq")]
    entered = sorted({m for m, _ in calls})
    # after buildctl exits: from the return of the launcher's wait()
    exit_at = next(
        (
            i
            for i, (kind, m, f) in enumerate(events)
            if kind == "return" and f == "wait" and m.startswith("buildq.launchers")
        ),
        None,
    )
    after = events[exit_at + 1 :] if exit_at is not None else []
    # stays: runs of consecutive buildq events in one module
    stays: list[str] = []
    for _kind, m, _f in after:
        if not m.startswith("buildq"):
            continue
        if not stays or stays[-1] != m:
            stays.append(m)
    seen: set[str] = set()
    stay_returns = 0
    for m in stays:
        if m in seen:
            stay_returns += 1
        seen.add(m)
    # returns to a module already left: a call into a buildq module that was entered after the
    # exit, whose frames have all returned since, and that is not on the stack now
    stack: list[str] = []
    entered_after: set[str] = set()
    reentries: list[str] = []
    for index, (kind, m, f) in enumerate(events):
        if index <= (exit_at if exit_at is not None else len(events)):  # the stack as it was at the exit
            if kind == "call":
                stack.append(m)
            elif stack:
                stack.pop()
            continue
        if kind == "call":
            caller = stack[-1] if stack else "?"
            if m.startswith("buildq") and m != caller and m in entered_after and m not in stack:
                reentries.append(f"{caller} -> {m}.{f}")
            if m.startswith("buildq"):
                entered_after.add(m)
            stack.append(m)
        elif stack:
            stack.pop()
    counts: dict[str, int] = {}
    for pair in reentries:
        counts[pair] = counts.get(pair, 0) + 1
    return {
        "modules_entered": len(entered),
        "package_modules": package_modules,
        "modules": entered,
        "after_exit_modules": sorted({m for m in stays}),
        "after_exit_stays": len(stays),
        "after_exit_stay_returns": stay_returns,
        "after_exit_reentries": len(reentries),
        "reentered": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", default=str(ROOT), help="the checkout to measure (default: this one)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    tree = Path(args.tree).resolve()
    sys.path.insert(0, str(ROOT))
    from tests.standin import write_standin_executable  # this tree's stand-in drives both

    work = Path(tempfile.mkdtemp(prefix="buildq-trace-"))
    port = free_port()
    subprocess.run(
        ["redis-server", "--daemonize", "yes", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(work)],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    redis_url = f"redis://127.0.0.1:{port}"
    worker = None
    try:
        standin = write_standin_executable(work / "bin")
        ctx = work / "ctx"
        shutil.copytree(ROOT / "tests" / "fixtures" / "buildkit" / "contexts" / "ctx", ctx)
        (ctx / "app").mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDQ_")}
        env.update(
            BUILDQ_BROKER_URL=f"{redis_url}/0",
            BUILDQ_RESULT_BACKEND=f"{redis_url}/1",
            BUILDQ_LAUNCHER="local",
            BUILDQ_BUILDCTL_PATH=str(standin),
            BUILDQ_LOCAL_STATE_DIR=str(work / "state"),
            TRACE_OUT=str(work / "trace.json"),
            PYTHONPATH=str(tree),
        )
        worker = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, "worker", "--concurrency", "1", "--loglevel", "WARNING"],
            env=env, cwd=tree, stdout=open(work / "worker.log", "wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        job_id = uuid.uuid4().hex
        job = json.dumps({"job_id": job_id, "context": str(ctx), "tags": ["127.0.0.1:5000/demo/app:1"]})
        submit = subprocess.run(
            [sys.executable, "-m", "buildq", "submit", "--job-file", "-", "--wait", "--json",
             "--wait-timeout", "60"],
            env=env, cwd=tree, input=job, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if submit.returncode != 0:
            raise SystemExit(f"the job did not succeed:\n{submit.stdout}\n{submit.stderr}")
        deadline = time.monotonic() + 10
        while not (work / "trace.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        events = json.loads((work / "trace.json").read_text())
        if os.environ.get("TRACE_KEEP"):
            shutil.copy(work / "trace.json", os.environ["TRACE_KEEP"])
        package = sum(1 for p in (tree / "buildq").rglob("*.py"))
        figures = analyse(events, package)
        if args.json:
            print(json.dumps(figures, indent=2))
            return
        print(f"tree: {tree}")
        print(f"modules entered by one job: {figures['modules_entered']} of {package}")
        print(f"after buildctl exits: {figures['after_exit_stays']} stays, "
              f"{figures['after_exit_stay_returns']} of them in a module visited before; "
              f"{figures['after_exit_reentries']} returns to a module already left")  # fmt: skip
        print("modules after the exit: " + ", ".join(figures["after_exit_modules"]))  # type: ignore[arg-type]
        if figures["reentered"]:
            print(
                "returns (caller -> module.function, count): "
                + ", ".join(f"{pair} {n}" for pair, n in figures["reentered"].items())
            )  # type: ignore[union-attr]
        print("modules: " + ", ".join(figures["modules"]))  # type: ignore[arg-type]
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
