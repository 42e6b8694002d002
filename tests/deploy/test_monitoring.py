"""The monitoring files: the alert rules (promtool check and unit tests), the Grafana dashboard (its PromQL
checked by promtool too), and the optional kustomize component k8s/components/monitoring rendered over k8s/.
That every metric they name exists in a real daemon's /metrics is tests/integration/test_metrics.py's job."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import ROOT, tool
from tests.deploy.test_k8s import NAMESPACE, get, pod_labels, workloads

RULES = ROOT / "deploy" / "prometheus" / "chashd-rules.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "chashd-rules.test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "chashd.json"
COMPONENT = ROOT / "k8s" / "components" / "monitoring"
Doc = dict[str, Any]


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool (Debian's prometheus package; ./dev.sh test installs it)."""
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard's panels and variables."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            exprs.append(re.sub(r"^label_values\((\w+), \w+\)$", r"\1", query["query"]))
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (ours all start chashd_ or process_)."""
    return set(re.findall(r"\b((?:chashd|process)_[a-z0-9_]+)\b", expr))


class RuleTests:
    """deploy/prometheus/chashd-rules.yaml."""

    def test_check(self) -> None:
        """promtool check rules accepts the file."""
        result = promtool("check", "rules", str(RULES))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout

    def test_unit_tests(self) -> None:
        """promtool test rules passes every unit test, and they cover at least three alerts."""
        result = promtool("test", "rules", str(RULE_TESTS))
        assert result.returncode == 0, result.stdout + result.stderr
        tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
        tested = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
        assert len(tested) >= 3, tested

    def test_unit_tests_can_fail(self, tmp_path: Path) -> None:
        """The same unit tests fail against rules with a changed threshold (so the test above can fail)."""
        broken = RULES.read_text(encoding="utf-8").replace("> 0.9", "> 0.99")
        assert broken != RULES.read_text(encoding="utf-8")
        (tmp_path / "chashd-rules.yaml").write_text(broken)
        (tmp_path / "chashd-rules.test.yaml").write_text(RULE_TESTS.read_text(encoding="utf-8"))
        result = promtool("test", "rules", "chashd-rules.test.yaml", cwd=tmp_path)
        assert result.returncode != 0 and "ChashdMemoryNearLimit" in result.stdout + result.stderr

    def test_alerts(self) -> None:
        """The alerts the operators asked for are there, each with a severity, a summary and a description."""
        rules = [r for g in yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"] for r in g["rules"]]
        names = {r["alert"] for r in rules}
        assert {
            "ChashdNoRaftLeader",
            "ChashdNodeDown",
            "ChashdQuorumFailures",
            "ChashdHandoffStuck",
            "ChashdMemoryNearLimit",
            "ChashdDiskNearlyFull",
            "ChashdReplicasBehind",
        } <= names
        for rule in rules:
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]

    def test_runbook_in_usage(self) -> None:
        """USAGE.md says what to do about every alert."""
        text = (ROOT / "USAGE.md").read_text(encoding="utf-8")
        rules = [r for g in yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"] for r in g["rules"]]
        for rule in rules:
            assert f"`{rule['alert']}`" in text, rule["alert"]


class DashboardTests:
    """deploy/grafana/chashd.json."""

    def test_shape(self) -> None:
        """A dashboard of a current Grafana schema: unique panel ids, every panel placed and querying the
        dashboard's Prometheus data source variable."""
        dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
        assert dashboard["schemaVersion"] >= 39 and dashboard["uid"] == "chashd"
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids))
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        for panel in dashboard["panels"]:
            assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"])

    def test_what_it_shows(self) -> None:
        """Panels for request rate, errors and latency per command and surface, quorum failures, read repairs,
        keys and bytes per node, handoff, Raft leader changes and epoch, evictions and purges, connections."""
        exprs = "\n".join(dashboard_exprs())
        for name in (
            "chashd_request_duration_seconds_count",
            "chashd_request_duration_seconds_bucket",
            "chashd_request_errors_total",
            "chashd_quorum_failures_total",
            "chashd_read_repairs_total",
            "chashd_keys",
            "chashd_bytes",
            "chashd_handoff_records_pending",
            "chashd_raft_leader_changes_total",
            "chashd_epoch",
            "chashd_purged_total",
            "chashd_evictions_total",
            "chashd_connections",
        ):
            assert name in metric_names(exprs), name
        assert "by (surface, command)" in exprs and "histogram_quantile(0.99" in exprs

    def test_promql_parses(self, tmp_path: Path) -> None:
        """Every expression is valid PromQL: promtool checks them as recording rules (Grafana's variables
        replaced by values)."""
        rules = []
        for i, expr in enumerate(dashboard_exprs()):
            concrete = (
                expr.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$job", ".+")
            )  # fmt: skip
            rules.append({"record": f"chashd:dashboard:{i}", "expr": concrete})
        path = tmp_path / "dashboard-rules.yaml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        result = promtool("check", "rules", str(path))
        assert result.returncode == 0, result.stdout + result.stderr
        path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "x", "expr": "rate(x[1m]"}]}]}))
        assert promtool("check", "rules", str(path)).returncode != 0


@pytest.fixture(scope="module")
def with_component(tmp_path_factory: pytest.TempPathFactory) -> list[Doc]:
    """k8s/ with the monitoring component, rendered by kubectl kustomize from an overlay of the user's kind."""
    overlay = tmp_path_factory.mktemp("overlay")
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(ROOT / "k8s", overlay)],
                "components": [os.path.relpath(COMPONENT, overlay)],
            }
        )
    )
    result = subprocess.run([tool("kubectl"), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    """A label selector with matchLabels and matchExpressions (In, NotIn, Exists, DoesNotExist)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        ok = {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]
        if not ok:
            return False
    return True


class ComponentTests:
    """k8s/components/monitoring over k8s/."""

    def test_adds_only_its_objects(self, with_component: list[Doc]) -> None:
        """The component adds a PodMonitor, a PrometheusRule and a NetworkPolicy, all in the namespace, and
        leaves every object of k8s/ as it was."""
        result = subprocess.run(
            [tool("kubectl"), "kustomize", str(ROOT / "k8s")], capture_output=True, text=True, timeout=120
        )
        base = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        added = [doc for doc in with_component if doc not in base]
        assert sorted((d["kind"], d["metadata"]["name"]) for d in added) == [
            ("NetworkPolicy", "kvstore-metrics"),
            ("PodMonitor", "chashd"),
            ("PrometheusRule", "chashd"),
        ]
        assert len(with_component) == len(base) + 3
        assert all(d["metadata"]["namespace"] == NAMESPACE for d in added)

    def test_core_objects_validate(self, with_component: list[Doc]) -> None:
        """Every Kubernetes object of the result is valid 1.30, strictly, as k8s/ alone is."""
        for doc in with_component:
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                continue
            assert kubernetes_validate.validate(doc, "1.30.0", strict=True) == "1.30", doc["metadata"]["name"]

    def test_pod_monitor(self, with_component: list[Doc]) -> None:
        """The PodMonitor selects the gateway and kvstore pods (and no other) and scrapes /metrics on a
        container port they both name "http"."""
        monitor = get(with_component, "PodMonitor", "chashd")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        spec = monitor["spec"]
        assert set(spec) == {"selector", "podMetricsEndpoints"}
        for name in ("gateway", "kvstore"):
            assert _selects(spec["selector"], pod_labels(with_component, name)), name
            (workload,) = [w for w in workloads(with_component) if w["metadata"]["name"] == name]
            ports = {p["name"] for c in workload["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
            assert "http" in ports
        assert not _selects(spec["selector"], {"app.kubernetes.io/name": "debug"})
        (endpoint,) = spec["podMetricsEndpoints"]
        assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "relabelings", "metricRelabelings"}

    def test_prometheus_rule(self, with_component: list[Doc], tmp_path: Path) -> None:
        """The PrometheusRule's groups are deploy/prometheus/chashd-rules.yaml's, and promtool accepts them."""
        rule = get(with_component, "PrometheusRule", "chashd")
        assert rule["apiVersion"] == "monitoring.coreos.com/v1" and set(rule["spec"]) == {"groups"}
        assert rule["spec"] == yaml.safe_load(RULES.read_text(encoding="utf-8"))
        path = tmp_path / "from-k8s.yaml"
        path.write_text(yaml.safe_dump(rule["spec"]))
        assert promtool("check", "rules", str(path)).returncode == 0

    def test_prometheus_rule_file_current(self) -> None:
        """k8s/components/monitoring/prometheusrule.yaml is what deploy/prometheus/prometheusrule.py writes."""
        result = subprocess.run(
            [sys.executable, str(ROOT / "deploy" / "prometheus" / "prometheusrule.py"), "--check"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr

    def test_prometheus_reaches_kvstores(self, with_component: list[Doc]) -> None:
        """The added NetworkPolicy admits the namespace "monitoring" to the kvstores' HTTP port only."""
        policy = get(with_component, "NetworkPolicy", "kvstore-metrics")
        assert _selects(policy["spec"]["podSelector"], pod_labels(with_component, "kvstore"))
        (rule,) = policy["spec"]["ingress"]
        assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
        assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]
