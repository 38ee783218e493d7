"""The operator's files in ``deploy/`` are true to the worker: the alert rules pass their
``promtool`` unit tests, every dashboard, alert and autoscaler query names metrics a live worker
really serves, the Kubernetes manifests validate offline against the Kubernetes schemas (and KEDA's
for the ScaledObject), and the settings in the manifests and the systemd units are ones the worker
accepts, with stop timeouts derived from the build time limit."""

from __future__ import annotations

import configparser
import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from buildq.config import load_settings
from tests.conftest import scenario
from tests.harness import client_for, free_port, require_tool, wait_until
from tests.test_observability import scrape

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
DASHBOARD = DEPLOY / "grafana" / "buildq.json"
DOCS = ROOT / "docs" / "operations-kit.md"
#: the cluster versions the manifests are checked against (an older supported one, the newest known)
K8S_VERSIONS = ("1.29.0", None)
METRIC = re.compile(r"\bbuildq_[a-z0-9_]+")


def promtool() -> str:
    return require_tool("promtool", "Debian: apt-get install prometheus; .ci/run installs it")


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [d for d in manifests() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def alert_queries() -> list[str]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def keda_queries() -> list[str]:
    return [t["metadata"]["query"] for t in by_kind("ScaledObject")["spec"]["triggers"]]


# -- Prometheus ---------------------------------------------------------------------------------


def test_alert_rules_pass_their_unit_tests() -> None:
    tool = promtool()
    check = subprocess.run(
        [tool, "check", "rules", "alerts.yml"], cwd=PROMETHEUS, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    tests = subprocess.run(
        [tool, "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS, capture_output=True, text=True
    )
    assert tests.returncode == 0 and "SUCCESS" in tests.stdout, tests.stdout + tests.stderr
    config = subprocess.run(
        [tool, "check", "config", "prometheus.yml"], cwd=PROMETHEUS, capture_output=True, text=True
    )
    assert config.returncode == 0, config.stdout + config.stderr
    named = {
        r["alert"]
        for g in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
        for r in g["rules"]
    }
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts_test.yml").read_text()))
    assert named == tested  # every alert has a unit test
    assert {"BuildqBuildsFailing", "BuildqDaemonDown", "BuildqQueueAgeRising", "BuildqNoLiveWorker",
            "BuildqJanitorRequeues"} <= named  # fmt: skip


def test_dashboard_and_autoscaler_queries_are_promql(tmp_path: Path) -> None:
    tool = promtool()
    queries = dashboard_queries() + keda_queries()
    rules = {
        "groups": [{"name": "q", "rules": [{"record": f"q:{i}", "expr": q} for i, q in enumerate(queries)]}]
    }
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules))
    check = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_every_query_names_metrics_a_live_worker_serves(
    buildq_env, start_worker, context_dir, tmp_path
) -> None:
    port = free_port()
    env = {**buildq_env, "BUILDQ_METRICS_PORT": str(port), "BUILDQ_METRICS_DIR": str(tmp_path / "prom")}
    start_worker(env)
    client = client_for(env)
    ok = client.submit({"context": str(context_dir), "tags": ["reg/deploy:1"]})
    failing = scenario(kind="fail", error="failed to solve: dockerfile parse error on line 1")
    bad = client.submit(
        {"context": str(context_dir), "tags": ["reg/deploy:2"], "build_args": {"STANDIN_SCENARIO": failing}}
    )
    assert ok.wait(timeout=60)["state"] == "succeeded" and bad.wait(timeout=60)["state"] == "failed"
    served = wait_until(
        lambda: (
            (s := {k.split("{")[0] for k in scrape(port)})
            >= {"buildq_workers_live", "buildq_build_phase_seconds_bucket"}
            and s
        ),
        timeout=20,
    )
    for where, queries in (
        ("dashboard", dashboard_queries()),
        ("alerts", alert_queries()),
        ("keda", keda_queries()),
    ):
        for query in queries:
            unknown = set(METRIC.findall(query)) - served
            assert not unknown, f"{where}: {query!r} names {sorted(unknown)}, not served by a worker"
    # the operator's docs name only metrics that exist (a histogram by its base name)
    named = set(METRIC.findall(DOCS.read_text()))
    missing = {m for m in named if m not in served and not any(s.startswith(m + "_") for s in served)}
    assert not missing, f"docs/operations-kit.md names {sorted(missing)}"
    # the dashboard shows every gauge an operator and an autoscaler need
    shown = {m for q in dashboard_queries() for m in METRIC.findall(q)}
    assert {
        "buildq_queue_depth", "buildq_queue_oldest_age_seconds", "buildq_builds_running",
        "buildq_daemon_slots_in_use", "buildq_daemons_full", "buildq_workers_live",
        "buildq_jobs_waiting_for_daemon", "buildq_daemon_up", "buildq_builds_total",
        "buildq_build_attempts_total", "buildq_build_phase_seconds_bucket",
    } <= shown  # fmt: skip


def test_the_dashboard_is_importable() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert all(t["refId"] and t["expr"] for t in panel["targets"]), panel["title"]


# -- Kubernetes ---------------------------------------------------------------------------------


def _validate(doc: dict[str, Any]) -> None:
    """Validate ``doc`` offline: Kubernetes kinds against the Kubernetes schemas (strict: unknown
    fields rejected), a KEDA ScaledObject against KEDA's CRD models (unknown fields rejected too)."""
    if doc["apiVersion"].startswith("keda.sh/"):
        from cloudcoil.models.keda.v1alpha1 import ScaledObject

        assert doc["kind"] == "ScaledObject"
        model = ScaledObject.model_validate(doc)
        kept = model.model_dump(mode="json", by_alias=True, exclude_unset=True)
        assert kept == doc, "fields KEDA's ScaledObject does not know were dropped"
        return
    import kubernetes_validate

    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version or kubernetes_validate.utils.latest_version(), strict=True)


def test_kubernetes_manifests_validate_offline() -> None:
    docs = manifests()
    assert {d["kind"] for d in docs} >= {"Deployment", "StatefulSet", "ScaledObject", "ConfigMap", "Service"}
    for doc in docs:
        _validate(doc)
    assert all(d["metadata"].get("namespace") == "buildq" for d in docs if d["kind"] != "Namespace")


def test_the_validation_can_fail() -> None:
    import kubernetes_validate

    deployment = copy.deepcopy(by_kind("Deployment"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 60  # a misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)
    deployment = copy.deepcopy(by_kind("Deployment"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)
    scaled = copy.deepcopy(by_kind("ScaledObject"))
    scaled["spec"]["minReplicas"] = 1  # HPA's name, not KEDA's
    with pytest.raises(AssertionError):
        _validate(scaled)


def _worker_command(container: dict[str, Any]) -> list[str]:
    return list(container["command"])


def _concurrency(command: list[str]) -> int:
    return int(command[command.index("--concurrency") + 1])


def test_the_worker_deployment_stops_warm_and_fits_the_daemons() -> None:
    config, secret = (
        by_kind("ConfigMap", "buildq-worker")["data"],
        by_kind("Secret", "buildq-redis")["stringData"],
    )
    settings = load_settings({**config, **secret})  # the worker accepts them (unknown ones are refused)
    deployment = by_kind("Deployment", "buildq-worker")
    pod = deployment["spec"]["template"]["spec"]
    # a stopping pod's builds may run their whole time limit; the kubelet kills only after the grace
    assert settings.shutdown_grace_s >= settings.max_timeout_s
    assert pod["terminationGracePeriodSeconds"] == settings.shutdown_grace_s + 60
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (worker,) = pod["containers"]
    command = _worker_command(worker)
    assert command[:2] == ["buildq", "worker"]
    assert {p["containerPort"] for p in worker["ports"]} == {settings.metrics_port}
    # the daemons the workers are told of are the StatefulSet's pods, through its headless Service
    daemons = by_kind("StatefulSet", "buildkitd")
    service = by_kind("Service", "buildkitd")
    assert (
        service["spec"]["clusterIP"] == "None"
        and daemons["spec"]["serviceName"] == service["metadata"]["name"]
    )
    names = [
        f"tcp://buildkitd-{i}.buildkitd.buildq.svc.cluster.local:1234"
        for i in range(daemons["spec"]["replicas"])
    ]
    assert settings.daemons == names
    assert "moby/buildkit:v0.21.0" in {c["image"] for c in daemons["spec"]["template"]["spec"]["containers"]}
    assert "moby/buildkit:v0.21.0" in {c["image"] for c in pod["initContainers"]}
    # KEDA: one worker per --concurrency builds of demand, never more workers than daemon slots
    scaled = by_kind("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert int(trigger["metadata"]["threshold"]) == _concurrency(command)
    slots = len(settings.daemons) * settings.buildkit_max_builds
    assert scaled["spec"]["maxReplicaCount"] * _concurrency(command) <= slots
    assert scaled["spec"]["minReplicaCount"] >= 1  # the gauges come from the workers themselves


# -- systemd ------------------------------------------------------------------------------------


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((SYSTEMD / name).read_text())
    return parser


def env_file(path: Path) -> dict[str, str]:
    pairs = [
        line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#")
    ]
    return {k: v for k, v in pairs}


def test_the_systemd_worker_stops_warm() -> None:
    settings = load_settings(env_file(SYSTEMD / "worker.env"))
    service = unit("buildq-worker.service")["Service"]
    # SIGTERM to Celery's main process only: pool processes and buildctl are not signalled
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    assert settings.shutdown_grace_s >= settings.max_timeout_s
    assert int(service["TimeoutStopSec"]) == settings.shutdown_grace_s + 60
    assert service["EnvironmentFile"] == "/etc/buildq/worker.env"
    assert service["ExecStart"].split()[1:3] == ["worker", "--concurrency"]
    buildkitd = unit("buildkitd.service")["Service"]
    assert "tcp://0.0.0.0:1234" in buildkitd["ExecStart"] and settings.daemons == ["tcp://127.0.0.1:1234"]


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "Debian: apt-get install systemd")
    for name in ("buildq-worker.service", "buildkitd.service"):
        text = (SYSTEMD / name).read_text()
        # the programs are not installed here: verify the unit with a stand-in for each
        text = re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", text, flags=re.M)
        (tmp_path / name).write_text(text)
        out = subprocess.run([analyze, "verify", str(tmp_path / name)], capture_output=True, text=True)
        problems = [line for line in (out.stdout + out.stderr).splitlines() if name in line]
        assert out.returncode == 0 and not problems, out.stdout + out.stderr


def test_the_docs_name_files_that_exist() -> None:
    text = DOCS.read_text() + (DEPLOY / "README.md").read_text()
    paths = set(re.findall(r"`((?:deploy|bench|tests|docs)/[\w./-]+)`", text))
    paths |= {
        f"deploy/{p}" for p in re.findall(r"`((?:prometheus|grafana|systemd|kubernetes)/[\w./-]+)`", text)
    }
    assert paths and all((ROOT / p).exists() for p in paths if "*" not in p), sorted(
        p for p in paths if "*" not in p and not (ROOT / p).exists()
    )
    assert (ROOT / "docs" / "operations-kit-prometheus.png").stat().st_size > 10000
    assert "docs/operations-kit.md" in (ROOT / "README.md").read_text()
