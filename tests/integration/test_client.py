"""chashd.client against real daemons: 3 gateways and 3 kvstores, plus a gateway with no kvstores (it answers
503 to key requests) and a socket that never answers, for the failure paths."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted

from chashd.client import (
    AsyncKVStoreClient,
    KVStoreClient,
    NotFound,
    PreconditionFailed,
    Rejected,
    ServerError,
    Unauthorized,
    Unreachable,
)
from chashd.launcher import ClusterSecrets, Daemon, LocalCluster, clean_environ, free_ports

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """3 gateways (N=3, W=2, R=2) and 3 kvstores with the memory engine."""
    with LocalCluster(tmp_path_factory.mktemp("client"), gateways=3, kvstores=3, env=clean_environ()) as running:
        yield running


@pytest.fixture(scope="module")
def lonely(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway of its own with no kvstore: its /kv answers 503 (no replica to write to)."""
    workdir: Path = tmp_path_factory.mktemp("lonely")
    http, raft, line = free_ports(3)
    args = [
        "--gateway-id", "lonely",
        "--port", f"tcp:{http}:interface=127.0.0.1",
        "--line-port", f"tcp:{line}:interface=127.0.0.1",
        "--raft-port", str(raft),
    ]  # fmt: skip
    env = clean_environ(**ClusterSecrets.generate().environ())
    daemon = Daemon("chash-gateway", "lonely", args, http, workdir / "lonely.log", env=env)
    try:
        daemon.start().wait_healthy(30)
        yield daemon.url
    finally:
        daemon.stop(10)


@pytest.fixture
def silent() -> Iterator[str]:
    """A URL whose socket accepts connections (the kernel's backlog) and never answers."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    try:
        yield f"http://127.0.0.1:{s.getsockname()[1]}"
    finally:
        s.close()


@pytest.fixture
def answers_early() -> Iterator[str]:
    """A URL whose server reads a request's head, answers 413 at once (as a gateway does for a body over its
    limit) and closes with unread bytes, so that the client, still sending, gets a reset."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(30)
    body = b'{"status": 413, "title": "Payload Too Large", "detail": "the value is over the limit"}'
    answer = (
        b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/problem+json\r\n"
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        + body
    )

    def serve() -> None:
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        with connection:
            connection.settimeout(30)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = connection.recv(65536)
                if not chunk:
                    return
                head += chunk
            connection.sendall(answer)
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close: a reset

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        server.join(timeout=30)


def dead_url() -> str:
    """A loopback URL nobody listens on (connection refused)."""
    return f"http://127.0.0.1:{free_ports(1)[0]}"


class BlockingClientTests:
    """KVStoreClient over real gateways."""

    def test_round_trip_across_gateways(self, cluster: LocalCluster) -> None:
        """A value written through one gateway reads back through another with its flags, TTL and version."""
        writer = KVStoreClient(cluster.gateway_urls[0], timeout=10)
        reader = KVStoreClient(cluster.gateway_urls[2], timeout=10)
        writer.put("client:bin", b"\x00\xff\r\n", ttl=3600, flags=42)
        item = reader.get_item("client:bin")
        assert item is not None
        assert (item.value, item.flags) == (b"\x00\xff\r\n", 42)
        assert item.expires_at > time.time() and item.cas > 0
        assert reader.get("client:missing") is None
        assert writer.delete("client:bin") is True
        assert reader.get("client:bin") is None
        assert reader.delete("client:bin") is False

    def test_many_keys_one_connection(self, cluster: LocalCluster) -> None:
        """Hundreds of requests reuse a persistent connection per gateway and all succeed."""
        client = KVStoreClient(cluster.gateway_urls, timeout=10)
        for i in range(300):
            client.put(f"many:{i}", f"v{i}")
        assert all(client.get(f"many:{i}") == f"v{i}".encode() for i in range(300))
        client.close()

    def test_conditional(self, cluster: LocalCluster) -> None:
        """cas= and only_if_absent are enforced by the cluster; a failed condition is PreconditionFailed."""
        client = KVStoreClient(cluster.gateway_urls, timeout=10)
        client.put("client:cas", b"1", only_if_absent=True)
        with pytest.raises(PreconditionFailed):
            client.put("client:cas", b"1", only_if_absent=True)
        item = client.get_item("client:cas")
        assert item is not None
        client.put("client:cas", b"2", cas=item.cas)
        with pytest.raises(PreconditionFailed, match="changed"):
            client.put("client:cas", b"3", cas=item.cas)

    def test_ring_lookup_status(self, cluster: LocalCluster) -> None:
        """lookup agrees with the ring rebuilt locally; status names the leader and the three nodes; drain
        needs the cluster's token (Unauthorized without it)."""
        client = KVStoreClient(cluster.gateway_urls, timeout=10, token=cluster.token)
        ring = client.hash_ring()
        found = client.lookup("user:42")
        assert [n["id"] for n in found["nodes"]] == list(ring.preference_list("user:42", 3))
        status = client.status()
        assert status["leader"] in {g.name for g in cluster.gateways}
        assert {n["id"] for n in client.nodes()} == {k.name for k in cluster.kvstores}
        assert client.node(found["nodes"][0]["id"])["state"] == "up"
        with pytest.raises(NotFound, match="no node 'nobody'"):
            client.drain("nobody")
        with pytest.raises(Unauthorized):
            KVStoreClient(cluster.gateway_urls, timeout=10).drain("nobody")
        assert abs(sum(ring.shares().values()) - 1.0) < 1e-9

    def test_failover_refused(self, cluster: LocalCluster) -> None:
        """A gateway that refuses connections is skipped, and the working one is asked first afterwards."""
        client = KVStoreClient([dead_url(), cluster.gateway_urls[1]], timeout=10)
        client.put("client:failover", b"ok")
        started = time.monotonic()
        assert client.get("client:failover") == b"ok"
        assert time.monotonic() - started < 2

    def test_failover_timeout(self, cluster: LocalCluster, silent: str) -> None:
        """A gateway that never answers costs one timeout, then the next one answers."""
        client = KVStoreClient([silent, cluster.gateway_urls[0]], timeout=1.0)
        started = time.monotonic()
        client.put("client:slow", b"ok")
        assert 0.9 < time.monotonic() - started < 8
        assert client.get("client:slow") == b"ok"

    def test_failover_503(self, cluster: LocalCluster, lonely: str) -> None:
        """A gateway answering 503 (no kvstores) is skipped; alone, its 503 detail is the ServerError."""
        KVStoreClient([lonely, cluster.gateway_urls[2]], timeout=10).put("client:503", b"ok")
        with pytest.raises(ServerError) as caught:
            KVStoreClient([dead_url(), lonely], timeout=10).put("client:503", b"no")
        assert caught.value.status == 503 and caught.value.url == f"{lonely}/kv/client%3A503"
        assert str(caught.value)

    def test_unreachable(self) -> None:
        """With no gateway reachable, Unreachable names each URL and why."""
        urls = [dead_url(), dead_url()]
        with pytest.raises(Unreachable) as caught:
            KVStoreClient(urls, timeout=2).get("k")
        assert set(caught.value.errors) == set(urls)
        assert "connection refused" in str(caught.value)

    def test_answer_before_the_body(self, answers_early: str) -> None:
        """A server that answers before it has read the whole body and resets the connection: the client
        reports that answer (Rejected, 413), not an unreachable gateway."""
        client = KVStoreClient(answers_early, timeout=10)
        with pytest.raises(Rejected) as refused:
            client.put("client:big", b"x" * (8 * 1024 * 1024))
        assert refused.value.status == 413 and "over the limit" in str(refused.value)

    def test_bad_requests(self, cluster: LocalCluster) -> None:
        """A bad key is refused before sending; a value over the server's limit is the server's 413 Rejected."""
        client = KVStoreClient(cluster.gateway_urls, timeout=10)
        with pytest.raises(Rejected, match="longer than 250"):
            client.get("k" * 251)
        with pytest.raises(Rejected) as caught:
            client.put("client:big", b"x" * (1024 * 1024 + 1))
        assert caught.value.status == 413

    def test_kvstore_url(self, cluster: LocalCluster) -> None:
        """A kvstore's own URL serves the key-value calls (writes with the cluster's token: Unauthorized
        without it); its missing /ring is NotFound."""
        with pytest.raises(Unauthorized):
            KVStoreClient(cluster.kvstores[0].url, timeout=10).put("client:direct", b"forged")
        client = KVStoreClient(cluster.kvstores[0].url, timeout=10, token=cluster.token)
        client.put("client:direct", b"d")
        assert client.get("client:direct") == b"d"
        with pytest.raises(NotFound, match="no such resource"):
            client.ring()


class AsyncClientTests:
    """AsyncKVStoreClient on the real reactor over real gateways."""

    @pytest_twisted.ensureDeferred
    async def test_operations_and_failover(self, cluster: LocalCluster) -> None:
        """put/get/delete/lookup/status through a dead URL first; errors fail the Deferred."""
        from twisted.internet import reactor

        client = AsyncKVStoreClient(reactor, [dead_url(), *cluster.gateway_urls], timeout=10)
        try:
            await client.put("async:1", b"one", flags=3)
            item = await client.get_item("async:1")
            assert item is not None and (item.value, item.flags) == (b"one", 3)
            found = await client.lookup("async:1")
            assert len(found["nodes"]) == 3
            status = await client.status()
            assert status["epoch"] >= 1
            assert (await client.hash_ring()).node_for("async:1") == found["nodes"][0]["id"]
            assert await client.delete("async:1") is True
            assert await client.get("async:1") is None
            with pytest.raises(NotFound):
                await client.node("nobody")
        finally:
            await client.close()

    @pytest_twisted.ensureDeferred
    async def test_unreachable(self) -> None:
        """With no gateway reachable the Deferred fails with Unreachable."""
        from twisted.internet import reactor

        client = AsyncKVStoreClient(reactor, [dead_url()], timeout=5)
        with pytest.raises(Unreachable, match="connection refused"):
            await client.get("k")
        await client.close()


class OpenAPIServedTests:
    """The real daemons serve their OpenAPI document (a file installed with the package)."""

    def test_both_roles(self, cluster: LocalCluster) -> None:
        """A gateway's /openapi.json has the /ring paths, a kvstore's only the shared surface."""
        import json
        import urllib.request

        with urllib.request.urlopen(cluster.gateway_urls[0] + "/openapi.json", timeout=10) as answer:
            gateway = json.load(answer)
        with urllib.request.urlopen(cluster.kvstores[0].url + "/openapi.json", timeout=10) as answer:
            kvstore = json.load(answer)
        assert gateway["openapi"].startswith("3.1") and "/ring/status" in gateway["paths"]
        assert "/kv/{key}" in kvstore["paths"] and not any(p.startswith("/ring") for p in kvstore["paths"])
