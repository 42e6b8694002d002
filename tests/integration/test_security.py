"""The attacks SECURITY.md lists, against real daemons on loopback: each one is refused, and the cluster keeps
serving plain memcached clients as before. (The Raft pickle is in test_gateway_cluster.py, BadRaftConfigTests.)"""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymemcache.client.base import Client

from chashd.launcher import Daemon, LocalCluster, clean_environ, free_ports
from tests.integration.conftest import wait_until

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One gateway (N=3, W=2, R=2) over three kvstores, with the cluster's random secrets."""
    workdir: Path = tmp_path_factory.mktemp("security")
    with LocalCluster(workdir, gateways=1, kvstores=3, env=clean_environ()) as running:
        yield running


class Line:
    """A raw line-protocol connection: what an attacker types."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        """Close the connection."""
        self.file.close()
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Send raw bytes."""
        self.sock.sendall(data)

    def line(self) -> bytes:
        """One reply line, without its CRLF."""
        line = self.file.readline()
        assert line.endswith(b"\r\n"), f"connection closed or cut: {line!r}"
        return line[:-2]

    def command(self, line: bytes, data: bytes | None = None) -> bytes:
        """A command (and its data block); its one-line reply."""
        self.send(line + b"\r\n" + (data + b"\r\n" if data is not None else b""))
        return self.line()

    def get(self, key: bytes) -> bytes | None:
        """A plain memcached ``get``: the value, or None."""
        self.send(b"get " + key + b"\r\n")
        header = self.line()
        if header == b"END":
            return None
        value = self.file.read(int(header.split()[3]) + 2)
        assert value.endswith(b"\r\n") and self.line() == b"END"
        return value[:-2]

    def xget(self, key: bytes) -> list[bytes]:
        """The XVALUE header of ``key`` (split), or [] when the node has nothing."""
        self.send(b"xget " + key + b"\r\n")
        header = self.line()
        if header == b"END":
            return []
        value = self.file.read(int(header.split()[6]) + 2)
        assert value.endswith(b"\r\n") and self.line() == b"END"
        return header.split()[1:6] + [value[:-2]]


def kvstore_lines(cluster: LocalCluster, token: str | None = None) -> list[Line]:
    """A raw connection to every kvstore's line port, authenticated with ``token`` when given."""
    lines = [Line(cluster.line_ports[k.name]) for k in cluster.kvstores]
    if token is not None:
        for line in lines:
            assert line.command(b"xauth " + token.encode()) == b"OK"
    return lines


def gateway_client(cluster: LocalCluster) -> Client:
    """A plain memcached client of the gateway."""
    port = cluster.line_ports[cluster.gateways[0].name]
    return Client((HOST, port), connect_timeout=5, timeout=10, default_noreply=False)


def refused(line: Line, command: bytes, data: bytes) -> None:
    """``command`` is answered with a CLIENT_ERROR. A command line refused as malformed leaves its data block
    unread, which is then read as a command and answered ERROR, as memcached does for a bad ``set`` line."""
    reply = line.command(command, data)
    assert reply.startswith(b"CLIENT_ERROR "), reply
    if reply.startswith(b"CLIENT_ERROR bad "):  # bad version, bad command line format
        assert line.line() == b"ERROR"


class KVStoreLineAuthTests:
    """Anyone who reached a kvstore's line port could send the versioned extension and flush_all: now only a
    connection that proved the cluster token can; plain memcached reads stay open."""

    def test_without_the_token(self, cluster: LocalCluster) -> None:
        """xput, xmove, xapply, xget, flush_all and plain writes are refused on every kvstore, nothing changes;
        plain gets answer; a wrong token closes the connection; the refusals show in /metrics."""
        mc = gateway_client(cluster)
        assert mc.set(b"guarded", b"kept")
        lines = kvstore_lines(cluster)
        try:
            for line in lines:
                for command, data in [
                    (b"xput guarded 0 0 1-x 0 4", b"pin!"),
                    (b"xmove guarded 0 0 1-x 0 4", b"pin!"),
                    (b"xapply 1-x set guarded 0 0 4", b"pin!"),
                    (b"xget guarded", None),
                    (b"flush_all", None),
                    (b"set guarded 0 0 4", b"pin!"),
                    (b"delete guarded", None),
                ]:
                    reply = line.command(command, data)
                    assert reply == b"CLIENT_ERROR authentication required: send xauth <token> first", command
            # Plain reads stay open (N=3 over three kvstores: each gets the value, the third maybe a moment later).
            wait_until(
                "every replica to answer a plain get", lambda: [ln.get(b"guarded") for ln in lines] == [b"kept"] * 3
            )
            assert lines[0].command(b"xauth not-the-token").startswith(b"CLIENT_ERROR authentication failed")
            assert lines[0].file.read() == b""  # the kvstore closed the connection
        finally:
            for line in lines:
                line.close()
        assert mc.get(b"guarded") == b"kept"
        metrics = urllib.request.urlopen(cluster.kvstores[0].url + "/metrics", timeout=10).read().decode()
        assert "chashd_line_commands_refused_total 7.0" in metrics
        assert "chashd_line_auth_failures_total 1.0" in metrics
        mc.close()


class ForgedVersionTests:
    """``xput victim 0 0 18446744073709551615-x 0 4`` pinned a value forever: refused now at every kvstore,
    even from a connection that proved the token."""

    @pytest.mark.parametrize(
        "version",
        [
            b"18446744073709551615-x",  # 64 bits: past the engines' columns
            b"9223372036854775807-x",  # 63 bits: the largest SQLite integer, centuries ahead
            b"%d-x" % (((int(__import__("time").time()) + 3600) * 1000) << 16),  # one hour ahead
        ],
        ids=["64-bit", "63-bit", "hour-ahead"],  # the same in every pytest process (xdist), whatever the time
    )
    def test_far_future_xput(self, cluster: LocalCluster, version: bytes) -> None:
        """Each kvstore refuses the forged xput and the forged tombstone with CLIENT_ERROR and keeps what it
        had; later sets through the gateway win and read back; the replicas agree; direct writes work."""
        mc = gateway_client(cluster)
        key = b"victim-" + version[:6]
        assert mc.set(key, b"before")
        lines = kvstore_lines(cluster, cluster.token)
        try:
            before = [line.xget(key) for line in lines]
            for line in lines:
                refused(line, b"xput %s 0 0 %s 0 4" % (key, version), b"pin!")
                refused(line, b"xput %s 0 0 %s 1 0" % (key, version), b"")
            assert [line.xget(key) for line in lines] == before
            assert mc.set(key, b"after")
            assert mc.get(key) == b"after"
            # N=3 over three kvstores: each one ends with the same record (the third may take a moment).
            wait_until(
                "the three replicas to hold the same record",
                lambda: (
                    len({tuple(line.xget(key)) for line in lines} - {()}) == 1
                    and all(line.xget(key)[-1:] == [b"after"] for line in lines)
                ),
            )
            # The kvstore's own clock was not dragged along: a direct write still works.
            assert lines[0].command(b"set direct-" + key + b" 0 0 2", b"ok") == b"STORED"
        finally:
            for line in lines:
                line.close()
            mc.close()


class SlowReaderTests:
    """A client that pipelined gets of a large value and never read its replies pinned about 245 MB of a
    gateway (six such clients: 1.5 GB): bench/slow_reader.py now measures the growth and fails above 64 MB."""

    def test_gateway_rss_stays_bounded(self) -> None:
        """Six connections x 400 pipelined gets of a 1 MB value, never read: the gateway's RSS grows by at most
        64 MiB (the benchmark's figures are printed), and the gateway ran only a few of those gets."""
        bench = Path(__file__).resolve().parents[2] / "bench" / "slow_reader.py"
        result = subprocess.run(
            [sys.executable, str(bench), "--connections", "6", "--requests", "400", "--max-growth-mib", "64"],
            capture_output=True,
            timeout=300,
            env=clean_environ(),
        )
        print(result.stdout.decode(), result.stderr.decode()[-2000:])
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()[-2000:]
        assert b"bound 64 MiB: ok" in result.stdout


@pytest.fixture
def limited_kvstore(tmp_path: Path) -> Iterator[tuple[Daemon, int]]:
    """A kvstore on loopback (no token) that holds at most 3 connections per listener and cuts a request not
    whole after 2 seconds; the daemon and its line port."""
    http_port, line = free_ports(2)
    args = ["--node-id", "kv-limits", "--port", f"tcp:{http_port}:interface={HOST}", "--engine", "memory"]
    args += ["--line-port", f"tcp:{line}:interface={HOST}", "--max-connections", "3", "--client-timeout", "2"]
    daemon = Daemon("chash-kvstore", "kv-limits", args, http_port, tmp_path / "kv.log", env=clean_environ())
    try:
        daemon.start().wait_healthy(30)
        yield daemon, line
    finally:
        daemon.stop(10)


def metric(daemon: Daemon, name: str) -> float:
    """One sample of the daemon's /metrics (0 when absent)."""
    text = urllib.request.urlopen(daemon.url + "/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed ``sock`` (what it sent before is read and dropped); ``sock`` has a short
    timeout."""
    try:
        while sock.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def served(port: int) -> bool:
    """True when a new line-protocol connection gets ``version`` answered (not refused)."""
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(b"version\r\n")
        return s.makefile("rb").readline().startswith(b"VERSION ")


class ConnectionLimitTests:
    """1,024 idle connections locked every new client out for the idle timeout (600 s): at --max-connections
    an idle connection now makes room, busy ones get the new client refused (counted), and a client that
    trickles a request is cut after --client-timeout."""

    def test_line_protocol(self, limited_kvstore: tuple[Daemon, int]) -> None:
        """Three half-sent commands hold the listener: a fourth client is refused with memcached's line and
        counted; the half-sent ones are cut after 2 s; then idle clients make room for a new one."""
        daemon, port = limited_kvstore
        busy = [socket.create_connection((HOST, port), timeout=10) for _ in range(3)]
        try:
            for s in busy:
                s.sendall(b"set k 0 0 10\r\nabc")
            open_line = 'chashd_connections{surface="line"}'
            wait_until("three connections counted", lambda: metric(daemon, open_line) == 3)
            with socket.create_connection((HOST, port), timeout=10) as refused:
                assert refused.makefile("rb").read() == b"ERROR Too many open connections\r\n"
            assert metric(daemon, 'chashd_connections_refused_total{surface="line"}') == 1
            for s in busy:
                s.settimeout(0.2)
            wait_until("the trickling clients to be cut", lambda: all(closed_by_server(s) for s in busy), 30)
            assert metric(daemon, 'chashd_connections_slow_closed_total{surface="line"}') == 3
        finally:
            for s in busy:
                s.close()
        idle = [socket.create_connection((HOST, port), timeout=10) for _ in range(3)]
        try:
            wait_until("three idle connections", lambda: metric(daemon, open_line) == 3)
            # Refused until one of them was idle a second, then served: it made room.
            wait_until("a new client to be served", lambda: served(port), 30)
            assert metric(daemon, 'chashd_connections_evicted_total{surface="line"}') == 1
        finally:
            for s in idle:
                s.close()

    def test_http(self, limited_kvstore: tuple[Daemon, int]) -> None:
        """At the limit with every connection in the middle of a request, a new one gets a 503 problem+json
        (counted); a client trickling its headers a byte every 0.2 s is cut after 2 s (counted)."""
        daemon, _ = limited_kvstore
        busy = [socket.create_connection((HOST, daemon.http_port), timeout=10) for _ in range(3)]
        try:
            for s in busy:
                s.sendall(b"GET /health HTTP/1.1\r\n")
            with socket.create_connection((HOST, daemon.http_port), timeout=10) as refused:
                answer = refused.makefile("rb").read()
            assert answer.startswith(b"HTTP/1.1 503 ") and b"too many open connections" in answer
            trickler = busy[0]
            trickler.settimeout(0.2)
            cut = False
            for byte in b"Host: kv\r\nX-Slow: " + b"x" * 150:  # 30 s at most
                if closed_by_server(trickler):
                    cut = True
                    break
                trickler.sendall(bytes([byte]))
            assert cut
            for s in busy:
                s.settimeout(0.2)
            wait_until("the other two to be cut", lambda: all(closed_by_server(s) for s in busy[1:]), 30)
            assert metric(daemon, 'chashd_connections_slow_closed_total{surface="http"}') == 3
            assert metric(daemon, 'chashd_connections_refused_total{surface="http"}') == 1
        finally:
            for s in busy:
                s.close()
