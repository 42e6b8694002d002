"""GET /metrics of real daemons: every metric name the Grafana dashboard and the alert rules (and their unit
tests) use exists in a gateway's or a kvstore's /metrics, and the figures move with real traffic."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheClientError

from chashd.client import KVStoreClient
from chashd.launcher import LocalCluster, clean_environ
from tests.deploy.test_monitoring import RULE_TESTS, RULES, dashboard_exprs, metric_names
from tests.integration.conftest import wait_until

pytestmark = pytest.mark.slow

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One gateway and two kvstores with the SQLite engine (so they have a data directory)."""
    with LocalCluster(
        tmp_path_factory.mktemp("metrics"), gateways=1, kvstores=2, engine="sqlite", env=clean_environ()
    ) as running:
        yield running


def scrape(url: str) -> Samples:
    """GET /metrics, parsed: (sample name, sorted labels) -> value."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value."""
    return samples[(name, tuple(sorted(labels.items())))]


def test_names_used_exist(cluster: LocalCluster, tmp_path: Path) -> None:
    """Every metric the dashboard's panels, the alert rules and the rules' unit tests name is a sample name
    of a real gateway's or kvstore's /metrics."""
    client = KVStoreClient(cluster.gateway_urls)
    client.put("metrics:a", b"1")
    client.get("metrics:a")
    names = {name for daemon in cluster.gateways + cluster.kvstores for name, _ in scrape(daemon.url)}
    used = set()
    for expr in dashboard_exprs():
        used |= metric_names(expr)
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    for rule in (r for g in groups for r in g["rules"]):
        used |= metric_names(rule["expr"])
    for test in yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]:
        for series in test["input_series"]:
            used |= {re.match(r"[a-z_0-9]+", series["series"]).group(0)}  # type: ignore[union-attr]
    assert len(used) > 20
    missing = sorted(used - names)
    assert not missing, f"used by the dashboard or the rules but not exported: {missing}"


def test_figures_follow_traffic(cluster: LocalCluster) -> None:
    """HTTP requests land in the gateway's histograms by command family, bad ones in its error counters;
    the gateway's Raft and ring figures and each kvstore's identity, keys and disk are there."""
    gateway = cluster.gateways[0]
    before = scrape(gateway.url)
    client = KVStoreClient(cluster.gateway_urls)
    for i in range(5):
        client.put(f"metrics:{i}", b"x" * 10)
    for i in range(7):
        client.get(f"metrics:{i}")
    client.delete("metrics:0")
    bad = urllib.request.Request(gateway.url + "/kv/" + "k" * 300, method="GET")
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(bad, timeout=10)
    after = scrape(gateway.url)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    count = "chashd_request_duration_seconds_count"
    assert grew(count, surface="http", command="store") == 5
    assert grew(count, surface="http", command="get") == 7
    assert grew(count, surface="http", command="delete") == 1
    assert grew("chashd_request_errors_total", surface="http", error="client") == 1
    assert grew("chashd_request_duration_seconds_bucket", surface="http", command="get", le="+Inf") == 7
    assert 0 < grew("chashd_request_duration_seconds_sum", surface="http", command="get") < 7 * 5.0
    assert value(after, "chashd_info", role="gateway", id=gateway.name, version=_version(after)) == 1
    assert value(after, "chashd_raft_leader_known") == 1 and value(after, "chashd_raft_has_quorum") == 1
    assert value(after, "chashd_ring_nodes", state="up") == 2

    def kv_figures() -> bool:
        for kvstore in cluster.kvstores:
            samples = scrape(kvstore.url)
            assert value(samples, "chashd_info", role="kvstore", id=kvstore.name, version=_version(samples)) == 1
            assert value(samples, "chashd_data_dir_free_bytes") > 0
            if value(samples, "chashd_keys") < 1:
                return False
        return True

    wait_until("both kvstores to hold keys", kv_figures, timeout=30)


def _version(samples: Samples) -> str:
    (labels,) = [dict(labels) for name, labels in samples if name == "chashd_info"]
    return labels["version"]


def test_line_protocol(cluster: LocalCluster) -> None:
    """memcached commands land in the gateway's line histograms by family, a bad one in its client errors;
    the kvstores time the versioned commands the gateway sent them (internal); an open connection shows in
    chashd_connections."""
    gateway = cluster.gateways[0]
    count = "chashd_request_duration_seconds_count"
    before = scrape(gateway.url)
    kv_before = sum(value(scrape(k.url), count, surface="line", command="internal") for k in cluster.kvstores)
    memcached = Client(("127.0.0.1", cluster.line_ports[gateway.name]), connect_timeout=5, timeout=5)
    try:
        memcached.set("metrics:line", b"1")
        assert memcached.get("metrics:line") == b"1"
        assert memcached.incr("metrics:line", 2) == 3
        samples = scrape(gateway.url)
        assert value(samples, "chashd_connections", surface="line") >= 1
        assert value(samples, "chashd_connections_accepted_total", surface="line") >= 1
        with pytest.raises(MemcacheClientError):  # the server's CLIENT_ERROR (pymemcache then closes)
            memcached.incr("metrics:line", -1)
    finally:
        memcached.close()
    samples = scrape(gateway.url)
    for family in ("store", "get", "arith"):
        line = {"surface": "line", "command": family}
        assert value(samples, count, **line) - value(before, count, **line) == 1, family
    errors = ("chashd_request_errors_total", (("error", "client"), ("surface", "line")))
    assert samples[errors] - before[errors] == 1
    kv_after = sum(value(scrape(k.url), count, surface="line", command="internal") for k in cluster.kvstores)
    assert kv_after - kv_before >= 3
