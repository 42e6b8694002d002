"""Gateway worker processes (--workers) and gateways that follow another's map (--follow), as real twistd
processes on loopback: keys served through every worker and follower, stats summed over workers, a killed
worker started again while the others serve, SIGTERM stopping every process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chashd.launcher import LocalCluster, clean_environ
from tests.integration.conftest import http, wait_until

pytestmark = pytest.mark.slow


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return sorted(int(p) for p in found)


class Client:
    """A line-protocol connection that reads whole replies."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def ask(self, request: bytes, end: bytes) -> bytes:
        """Send ``request``; the reply up to and including ``end`` (``b""`` once the server closed or reset)."""
        try:
            self.sock.sendall(request)
            while end not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return b""
                self.buffer += chunk
        except (ConnectionResetError, BrokenPipeError):
            return b""
        reply, _, self.buffer = self.buffer.partition(end)
        return reply + end

    def stats(self) -> dict[str, str]:
        """``stats`` as a dict."""
        reply = self.ask(b"stats\r\n", b"END\r\n")
        return {
            line.split()[1].decode(): line.split()[2].decode()
            for line in reply.splitlines()
            if line.startswith(b"STAT")
        }

    def worker(self) -> int:
        """The pid of the worker that serves this connection (``stats`` gives the answering worker's own)."""
        return int(self.stats()["pid"])

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()


def clients_by_worker(port: int, each: int, limit: int = 40) -> dict[int, list[Client]]:
    """Connections to a two-worker gateway's line port, by the pid of the worker serving them, opened one at a
    time until each worker serves ``each`` of them (at most ``limit`` connections).

    The main process hands a connection to the worker it believes has the fewest, counting the connections a
    worker closed until its next report (every second, later on a busy machine): right after other
    connections closed, several new ones can go to the same worker, so the test asks each where it landed.
    """
    by_worker: dict[int, list[Client]] = {}
    for _ in range(limit):
        client = Client(port)
        by_worker.setdefault(client.worker(), []).append(client)
        if len(by_worker) == 2 and all(len(clients) >= each for clients in by_worker.values()):
            return by_worker
    for clients in by_worker.values():
        for client in clients:
            client.close()
    counts = {pid: len(clients) for pid, clients in by_worker.items()}
    raise AssertionError(f"{limit} connections did not reach both workers {each} times each: {counts}")


def gateway_stats(url: str) -> dict[str, object]:
    """``GET /stats`` of a gateway."""
    status, body = http(url + "/stats")
    assert status == 200, body
    result: dict[str, object] = json.loads(body)
    return result


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One gateway with two workers over two kvstores (N=2, W=1, R=1)."""
    workdir: Path = tmp_path_factory.mktemp("workers")
    gateway_args = ["--workers", "2", "--replicas", "2", "--write-quorum", "1", "--read-quorum", "1"]
    with LocalCluster(workdir, gateways=1, kvstores=2, gateway_args=gateway_args, env=clean_environ()) as c:
        url = c.gateway_urls[0]
        wait_until("both workers serve", lambda: gateway_stats(url)["workers_serving"] == 2, timeout=60)
        yield c


class WorkersTests:
    """``--workers 2`` over real kvstores."""

    def test_every_worker_serves_and_stats_sum(self, cluster: LocalCluster) -> None:
        """Connections are shared out between the workers; each answers keys the other wrote, the main process
        reports each worker's connections, and ``stats`` on any connection counts the commands and connections
        of both."""
        gateway = cluster.gateways[0]
        by_worker = clients_by_worker(cluster.line_ports[gateway.name], each=2)
        clients = [client for served in by_worker.values() for client in served]
        try:
            assert set(by_worker) == set(children(gateway.pid or 0))
            for i, client in enumerate(clients):
                assert client.ask(b"set w%d 0 0 2\r\nv%d\r\n" % (i, i), b"\r\n") == b"STORED\r\n"
            for client in clients:
                for i in range(len(clients)):
                    assert client.ask(b"get w%d\r\n" % i, b"END\r\n") == b"VALUE w%d 0 2\r\nv%d\r\nEND\r\n" % (i, i)

            def reported() -> object:
                totals = str(gateway_stats(gateway.url)["worker_total_connections"]).split(",")
                return len(totals) == 2 and min(int(t) for t in totals) >= 2

            wait_until("each worker to report its connections", reported)
            gets = len(clients) ** 2
            wait_until(
                "stats to count both workers' commands",
                lambda: (
                    int(clients[0].stats()["cmd_get"]) >= gets
                    and int(clients[0].stats()["curr_connections"]) >= len(clients)
                ),
            )
            stats = clients[0].stats()
            assert stats["workers"] == "2" and int(stats["cmd_set"]) >= len(clients)
        finally:
            for client in clients:
                client.close()

    def test_http_kv_and_admin_routes(self, cluster: LocalCluster) -> None:
        """HTTP /kv is served by the workers; /ring, /health and /metrics answer for the whole gateway."""
        url = cluster.gateway_urls[0]
        assert http(url + "/kv/http-key", "PUT", b"hello")[0] in (200, 201, 204)
        assert http(url + "/kv/http-key") == (200, b"hello")
        status, body = http(url + "/ring/status")
        assert status == 200 and json.loads(body)["gateway_id"] == "gateway-1"
        status, body = http(url + "/metrics")
        assert status == 200 and b"chashd_workers 2.0" in body
        names = [family.name for family in text_string_to_metric_families(body.decode())]
        assert len(names) == len(set(names)), "one family per name: the workers' samples are merged in, labelled"
        assert b'process_resident_memory_bytes{worker="1"}' in body and b'worker="2"' in body
        status, body = http(url + "/ring/placement")
        assert status == 401, "the routing tells where the kvstores listen: the token guards it"

    def test_killed_worker_is_started_again(self, cluster: LocalCluster) -> None:
        """A worker killed with SIGKILL is started again; its clients see their connection closed, the other
        worker's clients keep their answers, and new connections are served."""
        gateway = cluster.gateways[0]
        assert gateway.pid is not None
        by_worker = clients_by_worker(cluster.line_ports[gateway.name], each=2)
        clients = [client for served in by_worker.values() for client in served]
        try:
            for client in clients:
                assert client.ask(b"set killed 0 0 1\r\nk\r\n", b"\r\n") == b"STORED\r\n"
            before = children(gateway.pid)
            assert sorted(by_worker) == before
            restarts = int(str(gateway_stats(gateway.url)["worker_restarts_total"]))
            victim, survivor = before
            os.kill(victim, signal.SIGKILL)
            for client in by_worker[victim]:
                assert client.ask(b"get killed\r\n", b"END\r\n") == b"", "a killed worker's client is cut"
            for client in by_worker[survivor]:
                assert client.ask(b"get killed\r\n", b"END\r\n") == b"VALUE killed 0 1\r\nk\r\nEND\r\n"
            wait_until(
                "the worker to be started again",
                lambda: (
                    gateway_stats(gateway.url)["worker_restarts_total"] == restarts + 1
                    and gateway_stats(gateway.url)["workers_serving"] == 2
                ),
            )
            assert victim not in children(gateway.pid) and len(children(gateway.pid)) == 2
            fresh = [Client(cluster.line_ports[gateway.name]) for _ in range(4)]
            for client in fresh:
                assert client.ask(b"get killed\r\n", b"END\r\n") == b"VALUE killed 0 1\r\nk\r\nEND\r\n"
                client.close()
        finally:
            for client in clients:
                client.close()

    def test_sigterm_stops_every_worker(self, tmp_path: Path) -> None:
        """SIGTERM to the gateway stops its workers, and it exits cleanly."""
        with LocalCluster(tmp_path, gateways=1, kvstores=1, gateway_args=["--workers", "2"], env=clean_environ()) as c:
            gateway = c.gateways[0]
            assert gateway.pid is not None
            wait_until("both workers serve", lambda: gateway_stats(gateway.url)["workers_serving"] == 2, timeout=60)
            workers = children(gateway.pid)
            assert len(workers) == 2
            assert gateway.stop(timeout=30) in (0, -signal.SIGTERM)
            wait_until("the workers to exit", lambda: not [p for p in workers if os.path.exists(f"/proc/{p}")])


class FollowerTests:
    """Gateways without Raft that follow the cluster's routing (``--follow``)."""

    def test_follower_serves_and_follows_changes(self, tmp_path: Path) -> None:
        """A follower serves keys by the Raft gateways' routing, sees the Raft gateway's writes, and follows a
        new kvstore's join; one with two workers does the same."""
        with LocalCluster(tmp_path, gateways=1, kvstores=1, env=clean_environ()) as c:
            plain = c.add_follower()
            workers = c.add_follower(["--workers", "2"])
            wait_until("the follower with workers to be ready", lambda: http(workers.url + "/ready")[0] == 200, 60)
            raft_client = Client(c.line_ports[c.gateways[0].name])
            clients = [Client(c.line_ports[f.name]) for f in (plain, workers)]
            try:
                assert raft_client.ask(b"set from-raft 0 0 1\r\nr\r\n", b"\r\n") == b"STORED\r\n"
                for i, client in enumerate(clients):
                    assert client.ask(b"get from-raft\r\n", b"END\r\n") == b"VALUE from-raft 0 1\r\nr\r\nEND\r\n"
                    assert client.ask(b"set from-f%d 0 0 1\r\nf\r\n" % i, b"\r\n") == b"STORED\r\n"
                    assert (
                        raft_client.ask(b"get from-f%d\r\n" % i, b"END\r\n")
                        == b"VALUE from-f%d 0 1\r\nf\r\nEND\r\n" % i
                    )
                epoch = int(clients[0].stats()["epoch"])
                c.add_kvstore()
                for client in clients:

                    def routes_by_the_new_ring(client: Client = client) -> bool:
                        stats = client.stats()
                        return int(stats["epoch"]) > epoch and stats["nodes"] == "2"

                    wait_until("the follower to route by the new ring", routes_by_the_new_ring)
            finally:
                raft_client.close()
                for client in clients:
                    client.close()

    def test_follower_without_the_token_is_not_ready(self, tmp_path: Path) -> None:
        """A follower that does not hold the cluster's token gets no routing and never says it is ready."""
        with LocalCluster(tmp_path, gateways=1, kvstores=1, env=clean_environ()) as c:
            wrong = tmp_path / "wrong-token"
            wrong.write_text("not-the-token\n")
            wrong.chmod(0o600)
            follower = c.add_follower(["--token-file", str(wrong)], wait=False)
            wait_until("the follower to be refused the routing", lambda: "HTTP 403" in follower.log_tail(40), 60)
            assert http(follower.url + "/ready")[0] == 503
