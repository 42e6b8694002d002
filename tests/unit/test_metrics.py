"""The Prometheus figures of both roles (chashd.web._metrics, chashd.gateway.metrics) in the exposition format
prometheus-client writes, and the HTTP surface's request timing and error counts through StubTreq."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from chashd.gateway.metrics import GatewayCollector
from chashd.gateway.raft import RaftStatus
from chashd.kvstore.backend import LocalBackend
from chashd.storage.memory import MemoryEngine
from chashd.web import KeyValueHTTP
from chashd.web._metrics import (
    BUCKETS,
    ConnectionsCollector,
    DiskCollector,
    LatencyHistogram,
    RequestMetrics,
    daemon_registry,
    memory_limit,
)
from tests.unit.test_ring_api import RingAPITestsBase


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the registry's exposition, parsed back: (name, sorted labels) -> value."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class LatencyHistogramTests(SynchronousTestCase):
    """Bucket counts as Prometheus reads them."""

    def test_buckets(self) -> None:
        """An observation counts in the first bucket whose bound is at least its value; cumulative buckets end
        with +Inf holding every observation; the sum adds up."""
        histogram = LatencyHistogram()
        for seconds in (0.00005, 0.0001, 0.0003, 0.7, 9.0):
            histogram.observe(seconds)
        buckets = dict(histogram.cumulative())
        assert buckets["0.0001"] == 2  # 50 us and exactly 100 us
        assert buckets["0.0005"] == 3 and buckets["0.5"] == 3 and buckets["1.0"] == 4 and buckets["5.0"] == 4
        assert buckets["+Inf"] == 5
        assert list(buckets)[:-1] == [repr(float(b)) for b in BUCKETS]
        assert abs(histogram.total - 9.70045) < 1e-9


class RequestMetricsTests(SynchronousTestCase):
    """The histograms and error counters of a daemon."""

    def test_exposition(self) -> None:
        """Every surface's families exist at zero from the start; observations and errors show in /metrics."""
        requests = RequestMetrics()
        registry = CollectorRegistry()
        registry.register(requests)
        found = samples(registry)
        assert found[("chashd_request_duration_seconds_count", (("command", "internal"), ("surface", "line")))] == 0
        assert ("chashd_request_duration_seconds_count", (("command", "internal"), ("surface", "http"))) not in found
        requests.histogram("line", "get").observe(0.0002)
        requests.histogram("line", "get").observe(0.002)
        requests.error("http", "client")
        found = samples(registry)
        line_get = (("command", "get"), ("surface", "line"))
        assert found[("chashd_request_duration_seconds_count", line_get)] == 2
        assert (
            found[
                ("chashd_request_duration_seconds_bucket", (("command", "get"), ("le", "0.00025"), ("surface", "line")))
            ]
            == 1
        )
        assert abs(found[("chashd_request_duration_seconds_sum", line_get)] - 0.0022) < 1e-12
        assert found[("chashd_request_errors_total", (("error", "client"), ("surface", "http")))] == 1
        assert found[("chashd_request_errors_total", (("error", "server"), ("surface", "http")))] == 0


class _Factory:
    curr_connections = 3
    total_connections = 10


class DaemonRegistryTests(SynchronousTestCase):
    """What every daemon exports besides its stats."""

    def directory(self) -> Path:
        """A new empty directory, removed after the test."""
        path = Path(tempfile.mkdtemp(prefix="chashd-test-"))
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)
        return path

    def test_registry(self) -> None:
        """Info with role and id, process figures, the memory limit, the data directory's disk, connections."""
        data_dir = self.directory()
        registry = daemon_registry("kvstore", "kv-a", ConnectionsCollector(_Factory()), data_dir=str(data_dir))
        found = samples(registry)
        (info,) = [labels for name, labels in found if name == "chashd_info"]
        assert dict(info)["role"] == "kvstore" and dict(info)["id"] == "kv-a"
        assert found[("process_resident_memory_bytes", ())] > 0
        assert found[("chashd_memory_limit_bytes", ())] >= found[("process_resident_memory_bytes", ())]
        assert 0 < found[("chashd_data_dir_free_bytes", ())] <= found[("chashd_data_dir_size_bytes", ())]
        assert found[("chashd_connections", (("surface", "line"),))] == 3
        assert found[("chashd_connections_accepted_total", (("surface", "line"),))] == 10

    def test_no_data_dir(self) -> None:
        """Without a data directory there is no disk figure; a directory that went away drops it too."""
        assert ("chashd_data_dir_free_bytes", ()) not in samples(daemon_registry("gateway", "g1"))
        registry = CollectorRegistry()
        registry.register(DiskCollector(str(self.directory() / "gone")))
        assert samples(registry) == {}

    def test_memory_limit_from_cgroup(self) -> None:
        """The smallest memory.max from the process's cgroup up to the root wins over the machine's memory;
        "max" means no limit at that level."""
        root = self.directory()
        (root / "proc" / "self").mkdir(parents=True)
        (root / "proc" / "self" / "cgroup").write_text("0::/system.slice/chash-kvstore.service\n")
        (root / "proc" / "meminfo").write_text("MemTotal:       16384 kB\nMemFree: 1 kB\n")
        unit = root / "cg" / "system.slice" / "chash-kvstore.service"
        unit.mkdir(parents=True)
        (unit / "memory.max").write_text("4096\n")
        (root / "cg" / "system.slice" / "memory.max").write_text("max\n")
        assert memory_limit(str(root / "proc"), str(root / "cg")) == 4096
        (unit / "memory.max").write_text("max\n")
        assert memory_limit(str(root / "proc"), str(root / "cg")) == 16384 * 1024
        assert memory_limit(str(root / "nothing"), str(root / "nothing")) is None


class GatewayCollectorTests(RingAPITestsBase):
    """Raft and ring figures of a real Membership over LocalRaft."""

    def test_figures(self) -> None:
        """Leader known, quorum and leadership as 0/1, leader changes counted, nodes counted by state."""
        self.register(node_id="kv-a")
        self.register(node_id="kv-b", port=8081)
        self.successResultOf(self.membership.mark_down("kv-b"))
        registry = CollectorRegistry()
        registry.register(GatewayCollector(self.membership))
        found = samples(registry)
        assert found[("chashd_raft_leader_known", ())] == 1 and found[("chashd_raft_is_leader", ())] == 1
        assert found[("chashd_raft_has_quorum", ())] == 1
        assert found[("chashd_raft_leader_changes_total", ())] == 1
        assert found[("chashd_ring_nodes", (("state", "up"),))] == 1
        assert found[("chashd_ring_nodes", (("state", "down"),))] == 1
        assert found[("chashd_ring_nodes", (("state", "leaving"),))] == 0
        self.rafts[0].listener.on_status(RaftStatus(None, False, False))
        self.rafts[0].listener.on_status(RaftStatus(self.rafts[0].settings.self_address, True, True))
        found = samples(registry)
        assert found[("chashd_raft_leader_changes_total", ())] == 3 and found[("chashd_raft_leader_known", ())] == 1


class HTTPRequestMetricsTests(SynchronousTestCase):
    """The HTTP surface times /kv requests by family and counts its error answers."""

    def setUp(self) -> None:
        self.requests = RequestMetrics()
        self.backend = LocalBackend(MemoryEngine(), "kv-a", Clock(), 1024)
        registry = CollectorRegistry()
        registry.register(self.requests)
        self.registry = registry
        self.stub: Any = StubTreq(KeyValueHTTP(self.backend, role="kvstore", requests=self.requests).resource())

    def tearDown(self) -> None:
        self.backend.stop()

    def ask(self, method: str, path: str, data: bytes | None = None) -> int:
        d = self.stub.request(method, "http://kv" + path, data=data)
        self.stub.flush()
        response = self.successResultOf(d)
        self.successResultOf(self.stub.content(response))
        return int(response.code)

    def test_counts(self) -> None:
        """PUT, GET, HEAD and DELETE land in store, get and delete; a miss is no error; a bad key and an
        unknown path are client errors."""
        assert self.ask("PUT", "/kv/a", b"x") == 204
        assert self.ask("GET", "/kv/a") == 200
        assert self.ask("HEAD", "/kv/a") == 200
        assert self.ask("GET", "/kv/missing") == 404
        assert self.ask("DELETE", "/kv/a") == 204
        assert self.ask("GET", "/kv/" + "k" * 251) == 400
        assert self.ask("GET", "/nothing") == 404
        found = samples(self.registry)

        def count(family: str) -> float:
            return found[("chashd_request_duration_seconds_count", (("command", family), ("surface", "http")))]

        assert (count("store"), count("get"), count("delete")) == (1, 3, 1)
        assert found[("chashd_request_errors_total", (("error", "client"), ("surface", "http")))] == 2
        assert found[("chashd_request_errors_total", (("error", "server"), ("surface", "http")))] == 0

    def test_server_error(self) -> None:
        """A surface that cannot serve (no backend: 503) counts a server error."""
        self.stub = StubTreq(KeyValueHTTP(None, role="kvstore", requests=self.requests).resource())
        assert self.ask("GET", "/kv/a") == 503
        assert self.requests.errors("http", "server") == 1 and self.requests.errors("http", "client") == 0
