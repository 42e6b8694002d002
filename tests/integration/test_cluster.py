"""Three gateways and three kvstores as real processes: routing, replication, failures."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymemcache.client.base import Client
from pymemcache.client.hash import HashClient

from chashd.launcher import LocalCluster, clean_environ
from tests.integration.conftest import http, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """3 gateways (N=3, W=2, R=2) and 3 kvstores; the tests that kill processes come last."""
    workdir: Path = tmp_path_factory.mktemp("cluster")
    with LocalCluster(
        workdir,
        gateways=3,
        kvstores=3,
        gateway_args=["--probe-interval", "0.3", "--down-after", "2", "--dead-after", "600"],
        env=clean_environ(),
    ) as running:
        yield running


def line_client(cluster: LocalCluster, gateway: int) -> Client:
    name = cluster.gateways[gateway].name
    return Client(("127.0.0.1", cluster.line_ports[name]), connect_timeout=5, timeout=10, default_noreply=False)


def holders(cluster: LocalCluster, key: str) -> list[str]:
    """The kvstores that hold ``key`` (asked directly, not through a gateway)."""
    return [k.name for k in cluster.kvstores if k.running() and http(f"{k.url}/kv/{key}")[0] == 200]


class RoutingTests:
    """Writes through one gateway read back through another, over the other surface."""

    def test_line_write_http_read(self, cluster: LocalCluster) -> None:
        """A set over the line protocol of gateway 1 reads back over HTTP from gateway 2, and vice versa."""
        mc1 = line_client(cluster, 0)
        for i in range(50):
            assert mc1.set(f"cross:{i}", f"value {i}\r\n".encode(), flags=i)
        for i in range(50):
            assert http(f"{cluster.gateway_urls[1]}/kv/cross:{i}") == (200, f"value {i}\r\n".encode())
        assert http(f"{cluster.gateway_urls[2]}/kv/from-http", "PUT", b"\x00\xffbinary")[0] == 204
        assert line_client(cluster, 0).get(b"from-http") == b"\x00\xffbinary"

    def test_pymemcache_hash_client(self, cluster: LocalCluster) -> None:
        """pymemcache's HashClient spread over the three gateways works as over three memcacheds: what it
        writes (each key through the gateway it hashes to) reads back through any one gateway."""
        servers = [("127.0.0.1", cluster.line_ports[g.name]) for g in cluster.gateways]
        client = HashClient(servers, connect_timeout=5, timeout=10, default_noreply=False)
        try:
            many = {f"hash:{i}": b"%d" % i for i in range(60)}
            assert client.set_many(many) == []
            assert client.get_many(list(many)) == many
            assert client.incr("hash:7", 3) == 10
            assert client.delete_many(["hash:1", "hash:2"])
            assert client.get("hash:1") is None
        finally:
            client.close()
        one = line_client(cluster, 2)
        assert one.get_many([f"hash:{i}" for i in range(3, 10)])["hash:7"] == b"10"
        assert one.get("hash:2") is None

    def test_replicated_on_at_least_w(self, cluster: LocalCluster) -> None:
        """Each acknowledged key is held by at least W=2 kvstores, and the lookup names its holders."""
        mc = line_client(cluster, 1)
        for i in range(30):
            assert mc.set(f"rep:{i}", b"x")
        for i in range(30):
            held = holders(cluster, f"rep:{i}")
            assert len(held) >= 2
            status, body = http(f"{cluster.gateway_urls[0]}/ring/lookup/rep:{i}")
            assert status == 200
            assert set(held) <= {n["id"] for n in json.loads(body)["nodes"]}

    def test_concurrent_increments_through_different_gateways(self, cluster: LocalCluster) -> None:
        """incr through three gateways at once loses no increment (the primary serializes them)."""
        line_client(cluster, 0).set(b"counter", b"0")
        errors: list[BaseException] = []

        def bump(gateway: int) -> None:
            try:
                mc = line_client(cluster, gateway)
                for _ in range(40):
                    mc.incr(b"counter", 1)
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=bump, args=(g,)) for g in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert int(line_client(cluster, 2).get(b"counter")) == 120

    def test_status(self, cluster: LocalCluster) -> None:
        """/ring/status names the leader, the quorums and every node up."""
        status = cluster.status(1)
        assert status["leader"] in {g.name for g in cluster.gateways}
        assert (status["replicas"], status["write_quorum"], status["read_quorum"]) == (3, 2, 2)
        assert {n["id"]: n["state"] for n in status["nodes"]} == {k.name: "up" for k in cluster.kvstores}


class FailureTests:
    """A dead kvstore turns down and reads go on; the leader's death costs the data plane nothing."""

    def test_kvstore_killed(self, cluster: LocalCluster) -> None:
        """After kill -9 of a kvstore, it turns down, and every key still reads back and writes succeed."""
        mc = line_client(cluster, 0)
        for i in range(40):
            assert mc.set(f"survive:{i}", b"%d" % i)
        victim = cluster.kvstores[0]
        victim.signal(signal.SIGKILL)
        victim.wait(10)
        wait_until(
            f"{victim.name} marked down",
            lambda: {n["id"]: n["state"] for n in cluster.status(0)["nodes"]}[victim.name] == "down",
            timeout=60,
        )
        for i in range(40):
            assert mc.get(f"survive:{i}") == b"%d" % i
            assert mc.set(f"after:{i}", b"ok")

    def test_leader_killed_without_data_plane_errors(self, cluster: LocalCluster) -> None:
        """Reads and writes through the other gateways go on without a single error while the leader dies."""
        # (Not cluster.wait_for_leader(): it fails on the kvstore test_kvstore_killed left dead.)
        leader = wait_until("a Raft leader", lambda: cluster.status(0)["leader"], timeout=60)
        victim = next(g for g in cluster.gateways if g.name == leader)
        others = [i for i, g in enumerate(cluster.gateways) if g is not victim]
        errors: list[str] = []
        done = threading.Event()
        count = [0]

        def traffic(gateway: int) -> None:
            mc = line_client(cluster, gateway)
            i = 0
            while not done.is_set():
                key = f"failover:{gateway}:{i}"
                try:
                    if not mc.set(key, b"v"):
                        errors.append(f"set {key} not stored")
                    if mc.get(key) != b"v":
                        errors.append(f"get {key} wrong")
                    status, _ = http(f"{cluster.gateways[gateway].url}/kv/{key}")
                    if status != 200:
                        errors.append(f"HTTP GET {key}: {status}")
                except Exception as e:
                    errors.append(f"{key}: {e!r}")
                i += 1
                count[0] += 1

        def new_leader() -> str | None:
            named = cluster.status(others[0])["leader"]
            return named if named is not None and named != leader else None

        threads = [threading.Thread(target=traffic, args=(g,)) for g in others]
        for t in threads:
            t.start()
        try:
            # Conditions, not fixed times: a loaded machine runs fewer requests a second, and elects later.
            wait_until("traffic through both gateways", lambda: count[0] >= 20 or errors, timeout=60)
            victim.signal(signal.SIGKILL)
            victim.wait(10)
            at_kill = count[0]
            elected = wait_until("a new leader", new_leader, timeout=60)
            # Requests go on after the election too, not only between the kill and it.
            at_election = count[0]
            wait_until("traffic after the election", lambda: count[0] >= at_election + 20 or errors, timeout=60)
        finally:
            done.set()
            for t in threads:
                t.join(30)
        assert errors == []
        assert count[0] > at_kill
        assert elected != leader
