"""The Prometheus figures of both roles (chashd.metrics, chashd.gateway.metrics) in the exposition format
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
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from chashd.errors import NodeLeaving
from chashd.gateway.metrics import GatewayCollector
from chashd.gateway.raft import RaftStatus
from chashd.kvstore.backend import LocalBackend
from chashd.metrics import (
    BUCKETS,
    ConnectionsCollector,
    DiskCollector,
    LatencyHistogram,
    RequestMetrics,
    daemon_registry,
    memory_limit,
)
from chashd.storage.memory import MemoryEngine
from chashd.web import KeyValueHTTP
from tests.unit.test_memcache_server import LaterBackend, connect, make_factory
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
        self.rafts[0].listener.on_status(RaftStatus(self.rafts[0].settings.self_address, True, True, True))
        found = samples(registry)
        assert found[("chashd_raft_leader_changes_total", ())] == 3 and found[("chashd_raft_leader_known", ())] == 1

    def test_cut_off_follower_knows_no_leader(self) -> None:
        """A follower that still names its last leader but has not heard from it within the election timeout
        (cut off from the other gateways) counts no known leader, as /ring/status names none; hearing from a
        leader again counts it."""
        registry = CollectorRegistry()
        registry.register(GatewayCollector(self.membership))
        self.rafts[0].lose_contact()
        found = samples(registry)
        assert found[("chashd_raft_leader_known", ())] == 0 and found[("chashd_raft_is_leader", ())] == 0
        assert self.membership.leader_known  # Raft still names it
        self.rafts[0].elect("127.0.0.1:8002")
        assert samples(registry)[("chashd_raft_leader_known", ())] == 1


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


class LineRequestMetricsTests(SynchronousTestCase):
    """The line protocol's server times each command into its family's histogram and counts error replies
    (chashd.memcache.server with ``requests``), over a real LocalBackend on StringTransport."""

    def setUp(self) -> None:
        self.requests = RequestMetrics()

    def count(self, family: str) -> int:
        """Observations of ``family`` on the line surface."""
        return int(self.requests.histogram("line", family).cumulative()[-1][1])

    def test_families(self) -> None:
        """A plain get read alone, then a pipelined read of every family: each counted once in its own;
        grouped xputs each in internal."""
        factory, _ = make_factory(requests=self.requests)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"get a\r\n")
        assert transport.value() == b"END\r\n" and self.count("get") == 1
        protocol.dataReceived(
            b"set k 0 0 1\r\n5\r\nget k\r\ngets k\r\nincr k 2\r\ntouch k 10\r\ndelete k\r\nversion\r\nstats\r\n"
            b"xput a 0 0 5-w 0 1\r\nx\r\nxput b 0 0 5-w 0 1\r\ny\r\n"
        )
        assert (self.count("store"), self.count("get"), self.count("arith")) == (1, 3, 1)
        assert (self.count("touch"), self.count("delete"), self.count("other"), self.count("internal")) == (1, 1, 2, 2)
        assert self.requests.errors("line", "client") == 0 and self.requests.errors("line", "server") == 0

    def test_errors(self) -> None:
        """ERROR and CLIENT_ERROR are client errors, SERVER_ERROR a server error, also under noreply."""
        factory, _ = make_factory(requests=self.requests)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"bogus\r\nincr k abc\r\nset big 0 0 5000 noreply\r\n")
        assert transport.value().startswith(b"ERROR\r\nCLIENT_ERROR ")
        assert self.requests.errors("line", "client") == 2 and self.requests.errors("line", "server") == 1

    def test_later_replies(self) -> None:
        """A reply that comes later (a gateway's) is timed when it comes; a failed one is also an error."""
        clock = Clock()
        backend = LaterBackend(clock)
        factory, _ = make_factory(backend, requests=self.requests)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"set k 0 0 1\r\nx\r\nget k\r\n")
        assert self.count("store") == 0 and self.count("get") == 0
        backend.fire(0)
        assert self.count("store") == 1 and self.count("get") == 0
        backend.waiting[1][0].errback(Failure(NodeLeaving("leaving")))
        assert self.count("get") == 1 and self.requests.errors("line", "server") == 1
        assert transport.value() == b"STORED\r\nSERVER_ERROR leaving\r\n"

    def test_off(self) -> None:
        """Without ``requests`` the server answers the same and keeps no figures."""
        factory, _ = make_factory()
        protocol, transport = connect(factory)
        protocol.dataReceived(b"set k 0 0 1\r\nx\r\nget k\r\nbogus\r\n")
        assert transport.value() == b"STORED\r\nVALUE k 0 1\r\nx\r\nEND\r\nERROR\r\n"
        assert factory.latency is None
