"""What answers to clients never carry: absolute paths, stack traces, secrets. The logs keep
the detail."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from chashd.commands import Status, Store, XGet, XPut
from chashd.errors import ConfigError
from chashd.kvstore.backend import LocalBackend
from chashd.memcache.client import KVClientProtocol, KVConnectionLost
from chashd.memcache.server import MemcacheServerFactory, MemcacheServerProtocol
from chashd.record import Record
from chashd.storage.memory import MemoryEngine
from chashd.storage.sqlite import SQLiteEngine
from chashd.tls import client_endpoint, https_policy, load_ca
from chashd.versions import Version
from chashd.web import KeyValueHTTP
from tests.certs import make_ca
from tests.unit.test_memcache_server import LaterBackend, connect, make_factory

T0 = 1_700_000_000.0


class DiskFullTests(SynchronousTestCase):
    """A real SQLite file that fills up (``PRAGMA max_page_count``: SQLite's own 'database or disk is full')."""

    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="chashd-diskfull-")).resolve()
        self.addCleanup(shutil.rmtree, self.directory)
        self.engine = SQLiteEngine(self.directory / "kvstore.db", page_size=4096)
        self.addCleanup(self.engine.close)
        pages = self.engine._db.execute("PRAGMA page_count").fetchone()[0]
        self.engine._db.execute(f"PRAGMA max_page_count = {pages + 2}")
        clock = Clock()
        clock.advance(T0)
        self.backend = LocalBackend(self.engine, "kv-1", clock, 1 << 20)

    def _fill(self, send: Any) -> Any:
        """Write 64 KiB values until one fails; that answer."""
        for i in range(100):
            answer = send(i)
            if answer is not None:
                return answer
        raise AssertionError("the database never filled up")

    def test_line_protocol(self) -> None:
        """SERVER_ERROR names the problem (the disk is full), not the file; the log has the path."""
        factory = MemcacheServerFactory(self.backend, Clock(), max_value_size=1 << 20)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        value = b"v" * 65536

        def send(i: int) -> bytes | None:
            transport.clear()
            protocol.dataReceived(b"set k%d 0 0 %d\r\n%s\r\n" % (i, len(value), value))
            reply = transport.value()
            return None if reply == b"STORED\r\n" else reply

        with capturedLogs() as events:
            reply = self._fill(send)
        assert reply == b"SERVER_ERROR out of disk space storing object: the disk is full\r\n"
        assert str(self.directory).encode() not in reply and b"/" not in reply
        (event,) = [e for e in events if e.get("detail")]
        assert str(self.directory / "kvstore.db") in event["detail"] and "is full" in event["detail"]
        assert self.backend.stats()["storage_errors_total"] == 1

    def test_other_failures(self) -> None:
        """Any other failure of the database (here: used after it was closed) is SQLite's words, no path."""
        factory = MemcacheServerFactory(self.backend, Clock(), max_value_size=1 << 20)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.engine.close()
        with capturedLogs() as events:
            protocol.dataReceived(b"set k 0 0 1\r\nv\r\n")
        reply = transport.value()
        assert reply.startswith(b"SERVER_ERROR the database failed: ") and b"/" not in reply, reply
        assert any(str(self.directory) in e.get("detail", "") for e in events)

    def test_http(self) -> None:
        """PUT /kv answers 507 problem+json naming the problem, without the path or a traceback."""
        stub: Any = StubTreq(KeyValueHTTP(self.backend, max_value_size=1 << 20).resource())
        value = b"v" * 65536

        def send(i: int) -> tuple[int, bytes] | None:
            response = self.successResultOf(stub.put(f"http://kv/kv/k{i}", data=value))
            body = self.successResultOf(stub.content(response))
            return None if response.code == 204 else (response.code, body)

        with capturedLogs():
            code, body = self._fill(send)
        problem = json.loads(body)
        assert code == 507 and problem["detail"] == "out of disk space storing object: the disk is full"
        assert str(self.directory).encode() not in body and b"Traceback" not in body


class KVStoreHTTPAuthTests(SynchronousTestCase):
    """A kvstore's HTTP writes need the cluster token (else anyone could write to a kvstore directly)."""

    def setUp(self) -> None:
        clock = Clock()
        clock.advance(T0)
        self.backend = LocalBackend(MemoryEngine(), "kv-1", clock, 1024)
        self.http = KeyValueHTTP(self.backend, write_token="the-token")
        self.stub: Any = StubTreq(self.http.resource())

    def request(self, method: str, path: str, token: str | None = None, data: bytes = b"") -> tuple[int, Any, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        response = self.successResultOf(self.stub.request(method, "http://kv" + path, data=data, headers=headers))
        return response.code, response.headers, self.successResultOf(self.stub.content(response))

    def test_writes_need_the_token(self) -> None:
        """PUT and DELETE: 401 (WWW-Authenticate) without the token, 403 with another, done with it; refusals
        are counted where /metrics and stats read them, and nothing was written by a refused request."""
        for method in ("PUT", "DELETE"):
            code, headers, body = self.request(method, "/kv/k", data=b"forged")
            assert code == 401 and headers.getRawHeaders("WWW-Authenticate") == ['Bearer realm="chashd"']
            assert json.loads(body)["title"] == "Unauthorized"
            code, _, body = self.request(method, "/kv/k", token="not-it", data=b"forged")
            assert code == 403 and b"not-it" not in body
        assert self.backend.engine.get(b"k") is None
        assert self.request("PUT", "/kv/k", token="the-token", data=b"v")[0] == 204
        assert self.http.auth_stats() == {"http_writes_refused_total": 4}

    def test_reads_stay_open(self) -> None:
        """GET /kv, /stats, /metrics, /health need nothing (the gateways serve the same data to anyone)."""
        self.request("PUT", "/kv/k", token="the-token", data=b"v")
        assert self.request("GET", "/kv/k")[::2] == (200, b"v")
        for path in ("/stats", "/metrics", "/health", "/ready"):
            assert self.request("GET", path)[0] == 200

    def test_wired_into_the_kvstore(self) -> None:
        """The kvstore daemon gives its HTTP surface the token and exports the refusals in /stats and /metrics."""
        from twisted.internet.defer import maybeDeferred
        from twisted.internet.testing import MemoryReactorClock

        from chashd.kvstore import tap

        options = tap.Options()
        options.parseOptions(["--node-id", "a", "--port", "18080", "--line-port", "18081", "--token", "tk"])
        reactor = MemoryReactorClock()
        tap.makeService(options, reactor=reactor, run_in_thread=maybeDeferred).startService()
        site: Any = [f for port, f, *_ in reactor.tcpServers if port == 18080][0]
        stub: Any = StubTreq(site.resource)
        assert self.successResultOf(stub.put("http://kv/kv/k", data=b"x")).code == 401
        stats = json.loads(self.successResultOf(stub.content(self.successResultOf(stub.get("http://kv/stats")))))
        assert stats["http_writes_refused_total"] == 1
        metrics = self.successResultOf(stub.content(self.successResultOf(stub.get("http://kv/metrics"))))
        assert b"chashd_http_writes_refused_total 1.0" in metrics


TOKEN = b"cluster-token-of-this-test"


class LineAuthTests:
    """A kvstore's line port with the cluster token: plain reads open, the rest after ``xauth`` (issue 10:
    anyone who reached a kvstore could send xput/xmove/xapply and flush_all)."""

    def setup_method(self) -> None:
        self.factory, _ = make_factory(token=TOKEN)
        self.engine: Any = self.factory.backend.engine  # type: ignore[attr-defined]
        self.engine.put(b"k", Record(b"v", 0, 0, Version(1 << 16, "gw")))

    def session(self, *chunks: bytes) -> tuple[MemcacheServerProtocol, StringTransport]:
        protocol, transport = connect(self.factory)
        for chunk in chunks:
            protocol.dataReceived(chunk)
        return protocol, transport

    @pytest.mark.parametrize(
        "request_bytes",
        [
            b"xput k 0 0 99-gw 0 4\r\npin!\r\n",
            b"xmove k 0 0 99-gw 0 4\r\npin!\r\n",
            b"xepoch 5\r\n",
            b"xapply 99-gw set k 0 0 4\r\npin!\r\n",
            b"xget k\r\n",
            b"xver k\r\n",
            b"xmap 5\r\n",
            b"xfence 5\r\n",
            b"xlease k gw1:7 1700000002000 x\r\n",
            b"xdeadline gw1:7 1700000002000 x\r\n",
            b"xrelease k gw1:7 1700000002000\r\n",
            b"flush_all\r\n",
            b"set k 0 0 4\r\npin!\r\n",
            b"add z 0 0 4\r\npin!\r\n",
            b"cas k 0 0 4 1\r\npin!\r\n",
            b"append k 0 0 1\r\n!\r\n",
            b"delete k\r\n",
            b"incr k 1\r\n",
            b"touch k 10\r\n",
            b"gat 10 k\r\n",
            b"cache_memlimit 64\r\n",
            b"shutdown\r\n",
            b"stats reset\r\n",
            b"ms k 4\r\npin!\r\n",
            b"ms z 4 ME\r\npin!\r\n",
            b"md k\r\n",
            b"md k I T30\r\n",
            b"ma k\r\n",
            b"mg k v T10\r\n",
            b"mg z v N30\r\n",
        ],
    )
    def test_refused_before_xauth(self, request_bytes: bytes) -> None:
        """Every internal verb, flush_all, every memcached write and the admin commands that change something
        are refused without the token, nothing changes, the refusal is counted."""
        _, transport = self.session(request_bytes)
        assert transport.value() == b"CLIENT_ERROR authentication required: send xauth <token> first\r\n"
        assert self.engine.get(b"k") == Record(b"v", 0, 0, Version(1 << 16, "gw"))
        assert self.engine.get(b"z") is None
        assert self.factory.auth_stats()["line_commands_refused_total"] == 1

    def test_refused_in_a_group_and_silently(self) -> None:
        """Pipelined xputs (the grouped path) and the delete a too-large set makes are refused as well."""
        puts = b"".join(b"xput g%d 0 0 9-gw 0 1\r\nx\r\n" % i for i in range(5))
        _, transport = self.session(puts + b"set k 0 0 5000\r\n" + b"x" * 5000 + b"\r\n")
        lines = transport.value().split(b"\r\n")[:-1]
        assert lines[:5] == [b"CLIENT_ERROR authentication required: send xauth <token> first"] * 5
        assert lines[5] == b"SERVER_ERROR object too large for cache"
        assert self.engine.get(b"k") is not None and self.engine.get(b"g0") is None

    def test_plain_reads_and_local_commands_open(self) -> None:
        """get and gets answer without the token (for debugging; the gateways serve the same to anyone), and so
        do stats, version and verbosity."""
        _, transport = self.session(b"get k\r\n", b"gets k nope\r\nversion\r\nverbosity 1\r\nstats\r\n")
        reply = transport.value()
        assert reply.startswith(b"VALUE k 0 1\r\nv\r\nEND\r\nVALUE k 0 1 65536\r\nv\r\nEND\r\nVERSION ")
        assert b"OK\r\nSTAT pid " in reply and b"STAT line_commands_refused_total" not in reply

    def test_meta_reads_open(self) -> None:
        """The meta commands that only read (mg without T or N, me, mn) answer without the token, as get does."""
        _, transport = self.session(b"mg k v f\r\nmg z v\r\nme z\r\nmn\r\n")
        assert transport.value() == b"VA 1 f0\r\nv\r\nEN\r\nEN\r\nMN\r\n"
        assert self.factory.auth_stats()["line_commands_refused_total"] == 0

    def test_meta_writes_after_xauth(self) -> None:
        """After xauth, ms, ma and md run (and the mg that creates)."""
        _, transport = self.session(
            b"xauth " + TOKEN + b"\r\nms k 3\r\nnew\r\nma n N0 J7 v\r\nmg z N30 s\r\nmd k q\r\nmn\r\n"
        )
        assert transport.value() == b"OK\r\nHD\r\nVA 1\r\n7\r\nHD s0 W\r\nMN\r\n"
        assert self.engine.get(b"k").tombstone

    def test_xauth_opens_the_connection(self) -> None:
        """After xauth with the token: OK, and the connection runs everything (a new one still does not)."""
        _, transport = self.session(b"xauth " + TOKEN + b"\r\nset k 0 0 3\r\nnew\r\nxget k\r\nflush_all\r\n")
        reply = transport.value()
        assert reply.startswith(b"OK\r\nSTORED\r\nXVALUE k 0 0 ") and reply.endswith(b"END\r\nOK\r\n")
        _, other = self.session(b"set k 0 0 3\r\nold\r\n")
        assert other.value().startswith(b"CLIENT_ERROR authentication required")

    def test_wrong_token_closes(self) -> None:
        """A wrong token is answered, counted and the connection closed; the commands behind it never run."""
        protocol, transport = self.session(b"xauth not-the-token\r\nflush_all\r\n")
        assert transport.value() == b"CLIENT_ERROR authentication failed: that is not the cluster's token\r\n"
        assert transport.disconnecting and self.engine.get(b"k") is not None
        assert self.factory.auth_stats() == {"line_commands_refused_total": 0, "line_auth_failures_total": 1}

    def test_constant_time_compare(self) -> None:
        """The token is compared with hmac.compare_digest (a prefix of the token is no token)."""
        import inspect

        from chashd.memcache.server import MemcacheServerProtocol as Server

        assert "hmac.compare_digest(command.token, factory.token)" in inspect.getsource(Server._authenticate)
        _, transport = self.session(b"xauth " + TOKEN[:-1] + b"\r\n")
        assert transport.value().startswith(b"CLIENT_ERROR authentication failed")

    def test_no_token_no_guard(self) -> None:
        """Without a token (a kvstore on loopback only), everything runs and xauth is a harmless OK."""
        factory, _ = make_factory()
        protocol, transport = connect(factory)
        protocol.dataReceived(b"xauth anything\r\nset k 0 0 1\r\nx\r\n")
        assert transport.value() == b"OK\r\nSTORED\r\n"


class ClientAuthTests(SynchronousTestCase):
    """KVClientProtocol and KVClientPool prove the token once per connection, before anything else."""

    def test_pooled_connection_authenticates(self) -> None:
        """A client given the token sends xauth first; its commands then run, the internal verbs included."""
        factory, clock = make_factory(token=TOKEN)
        client, server, pump = connectedServerAndClient(
            lambda: factory.buildProtocol(None), lambda: KVClientProtocol(clock, 5.0, token=TOKEN)
        )
        d = client.send(XPut(b"k", Record(b"v", 0, 0, Version(7 << 16, "gw"))))
        pump.flush()
        assert self.successResultOf(d) is Status.STORED
        assert factory.auth_stats() == {"line_commands_refused_total": 0, "line_auth_failures_total": 0}

    def test_refused_token_drops_the_connection(self) -> None:
        """A kvstore that refuses the token: the connection is dropped, its requests fail, the error is logged."""
        factory, clock = make_factory(token=TOKEN)
        with capturedLogs() as events:
            client, server, pump = connectedServerAndClient(
                lambda: factory.buildProtocol(None), lambda: KVClientProtocol(clock, 5.0, token=b"another")
            )
            pump.flush()
        self.failureResultOf(client.send(XGet((b"k",))), KVConnectionLost)
        assert not client.usable
        assert any("refused the cluster token" in str(e.get("log_format")) for e in events)

    def test_without_token_nothing_is_sent_first(self) -> None:
        """No token: the first bytes on the wire are the first command (plain memcached clients unchanged)."""
        transport = StringTransport()
        client = KVClientProtocol()
        client.makeConnection(transport)
        client.send(XGet((b"k",)))
        assert transport.value() == b"xget k\r\n"
        authed = KVClientProtocol(token=TOKEN)
        authed_transport = StringTransport()
        authed.makeConnection(authed_transport)
        assert authed_transport.value() == b"xauth " + TOKEN + b"\r\n"


class LineAuthTimedTests:
    """xauth with the latency histograms on (every command is timed into its family's histogram)."""

    def test_xauth_is_timed(self) -> None:
        """xauth counts as an internal command; the connection then runs the extension."""
        from chashd.metrics import RequestMetrics

        factory, _ = make_factory(token=TOKEN, requests=RequestMetrics())
        protocol, transport = connect(factory)
        protocol.dataReceived(b"xauth " + TOKEN + b"\r\nxget k\r\n")
        assert transport.value() == b"OK\r\nEND\r\n"


class LineMemoryTests:
    """Memory of a line-protocol connection is bounded in bytes (issue 10: a client that pipelined gets of a
    large value and never read held about 245 MB of a gateway: 256 replies of 1 MB)."""

    def setup_method(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.backend = LaterBackend(self.clock)
        self.backend.local.execute(Store("set", b"big", 0, 0, b"v" * 1000))
        # Each get is charged 1000 + 320 bytes while in flight: 4 of them pass 4096 bytes.
        self.factory = MemcacheServerFactory(self.backend, self.clock, max_value_size=1000, max_pending_bytes=4096)
        self.protocol, self.transport = connect(self.factory)

    def test_reading_pauses_at_the_byte_cap(self) -> None:
        """100 pipelined gets: 4 are sent to the backend, then reading pauses; as replies leave, more go."""
        self.protocol.dataReceived(b"get big\r\n" * 100)
        assert len(self.backend.waiting) == 4
        assert self.transport.producerState == "paused"
        assert self.factory.paused_for_memory == 1
        for i in range(4):
            self.backend.fire(i)
        # Reading resumed once enough of them left (below half the cap), and the next gets filled it again:
        # never more than 4 in flight.
        assert self.transport.value().count(b"VALUE big 0 1000") == 4
        assert 4 < len(self.backend.waiting) <= 8 and self.transport.producerState == "paused"

    def test_done_replies_wait_in_the_queue_while_the_client_does_not_read(self) -> None:
        """While the transport's buffer is full (pauseProducing), done replies are not written but kept and
        counted (so the cap holds); once it drains they leave, in order."""
        self.protocol.dataReceived(b"get big\r\n" * 3)
        self.protocol.pauseProducing()  # the client stopped reading
        for i in range(3):
            self.backend.fire(i)
        assert self.transport.value() == b""
        assert self.protocol._held == 3 * len(b"VALUE big 0 1000\r\n" + b"v" * 1000 + b"\r\nEND\r\n")
        self.protocol.resumeProducing()
        assert self.transport.value().count(b"VALUE big 0 1000") == 3 and self.protocol._held == 0

    def test_writes_are_charged_a_line(self) -> None:
        """Writes in flight cost a line each: the count cap (max_pending) stops them, not the byte cap."""
        # Fifty keys: pipelined writes of one key wait for each other (a connection's commands act in order).
        self.protocol.dataReceived(b"".join(b"set k%d 0 0 1\r\nx\r\n" % i for i in range(50)))
        assert len(self.backend.waiting) == 50 and self.transport.producerState == "producing"


class ConnectionLimitTests:
    """--max-connections: idle connections make room; busy ones do not (issue 10: 1,024 idle connections locked
    every new client out for the idle timeout, 600 s)."""

    def test_idle_connection_makes_room(self) -> None:
        """At the limit, the connection idle longest (at least a second) is closed and the new one served."""
        factory, clock = make_factory(max_connections=2)
        (_first, t1), (second, t2) = connect(factory), connect(factory)
        clock.advance(5)
        second.dataReceived(b"version\r\n")  # second was active since: first is the idle one
        clock.advance(2)
        third, t3 = connect(factory)
        assert t1.disconnecting and not t2.disconnecting and not t3.disconnecting
        third.dataReceived(b"get k\r\n")
        assert t3.value() == b"END\r\n"
        assert factory.idle_evicted == 1 and factory.rejected_connections == 0

    def test_refused_when_none_is_idle(self) -> None:
        """Connections with a command half-sent (or just active) are not closed: the new one is refused."""
        factory, clock = make_factory(max_connections=2)
        (first, t1), (second, t2) = connect(factory), connect(factory)
        first.dataReceived(b"set k 0 0 10\r\nabc")  # half-sent
        clock.advance(0.5)
        second.dataReceived(b"version\r\n")  # active half a second ago
        third, t3 = connect(factory)
        assert t3.value() == b"ERROR Too many open connections\r\n" and t3.disconnecting
        assert not t1.disconnecting and not t2.disconnecting and factory.rejected_connections == 1


class SlowClientTests:
    """A command left half-sent for --client-timeout seconds closes the connection (a trickling client)."""

    def test_half_sent_command_closes(self) -> None:
        """A data block short of its length, still short after 30 s: closed and counted."""
        factory, clock = make_factory(client_timeout=30.0)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"set k 0 0 100\r\n")
        for _ in range(29):
            clock.advance(1)
            protocol.dataReceived(b"x")  # one byte a second: the idle timeout alone would never fire
        assert not transport.disconnecting
        clock.advance(1)
        assert transport.disconnecting and factory.slow_closed == 1

    def test_whole_commands_never_time_out(self) -> None:
        """Whole commands, however far apart, and a line finished in time, are no slow client."""
        factory, clock = make_factory(client_timeout=30.0)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"get k\r\nset k 0")
        clock.advance(20)
        protocol.dataReceived(b" 0 1\r\nx\r\n")
        clock.advance(60)
        assert not transport.disconnecting and transport.value() == b"END\r\nSTORED\r\n"
        assert not any(getattr(c, "func", None) == protocol._too_slow for c in clock.getDelayedCalls())


class _HalfCloseTransport(StringTransport):
    """A StringTransport that records a half-close (loseWriteConnection)."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class HTTPLimitTests:
    """The HTTP listener's limits (chashd.web._limits): connections, slow clients, lingering refusals."""

    def setup_method(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(T0)
        backend = LocalBackend(MemoryEngine(), "kv-1", self.reactor, 1024)
        self.site = KeyValueHTTP(backend, max_value_size=1024).site(
            max_connections=2, idle_timeout=600.0, client_timeout=10.0, reactor=self.reactor
        )

    def connect(self) -> tuple[Any, _HalfCloseTransport]:
        protocol = self.site.buildProtocol(None)
        transport = _HalfCloseTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_trickled_headers_are_cut(self) -> None:
        """Headers sent a byte every half second never complete a request within 10 s: the connection is
        aborted (twisted.web's idle timeout alone restarts at every byte)."""
        channel, transport = self.connect()
        for byte in b"GET /health HTTP/1.1\r\nHost: kv\r\n":
            channel.dataReceived(bytes([byte]))
            self.reactor.advance(0.5)
            if transport.disconnecting:
                break
        assert transport.disconnecting and self.site.slow_closed == 1

    def test_unfinished_chunked_body_is_cut(self) -> None:
        """A chunked PUT whose last chunk never comes is cut after 10 s; a whole request is answered."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: kv\r\n\r\n")
        assert transport.value().startswith(b"HTTP/1.1 200 ")
        self.reactor.advance(60)
        assert not transport.disconnecting
        channel.dataReceived(b"PUT /kv/k HTTP/1.1\r\nHost: kv\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n")
        self.reactor.advance(10)
        assert transport.disconnecting and self.site.slow_closed == 1

    def test_idle_connections_make_room(self) -> None:
        """At --max-connections the idle connection is closed for the new one; with none idle, a 503."""
        first, t1 = self.connect()
        self.reactor.advance(2)
        second, t2 = self.connect()
        second.dataReceived(b"GET /hea")  # a request under way: not idle
        third, t3 = self.connect()
        assert t1.disconnecting and not t2.disconnecting and self.site.idle_evicted == 1
        fourth, t4 = self.connect()
        assert t4.value().startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and t4.write_closed
        assert b"too many open connections" in t4.value() and self.site.rejected_connections == 1

    def test_too_large_body_in_the_same_read(self) -> None:
        """A body over the limit that arrives with its headers is dropped unread: the 413 stays the answer and
        the connection closes lingering (it used to run the request without a body and fail, dropping the
        connection and the answer with it)."""
        channel, transport = self.connect()
        channel.dataReceived(b"PUT /kv/k HTTP/1.1\r\nHost: kv\r\nContent-Length: 2048\r\n\r\n" + b"x" * 2048)
        assert transport.value().startswith(b"HTTP/1.1 413 Payload Too Large\r\n")
        assert transport.write_closed and not transport.disconnecting
        self.reactor.advance(2)
        assert transport.disconnecting

    def test_too_large_body_lingers(self) -> None:
        """A 413 sent before the body was read shuts the write side and drops the rest of the body (a close with
        unread bytes sends a reset that can destroy the answer), then closes after a while."""
        channel, transport = self.connect()
        channel.dataReceived(b"PUT /kv/k HTTP/1.1\r\nHost: kv\r\nContent-Length: 5000\r\n\r\n" + b"x" * 100)
        assert transport.value().startswith(b"HTTP/1.1 413 Payload Too Large\r\n")
        assert transport.write_closed and not transport.disconnecting
        channel.dataReceived(b"x" * 4900)  # dropped
        self.reactor.advance(2)
        assert transport.disconnecting


class TLSOptionTests:
    """--tls-ca: the CA file is read before anything binds, and links to kvstores take TLS with it."""

    def test_no_ca_no_tls(self) -> None:
        """Without --tls-ca the links are plain TCP endpoints and HTTPS keeps the client's default policy."""
        assert load_ca(None) is None and https_policy(None) is None
        assert isinstance(client_endpoint(MemoryReactorClock(), "127.0.0.1", 11212, 5.0, None), HostnameEndpoint)

    def test_ca_wraps_links_in_tls(self, tmp_path: Path) -> None:
        """A CA made here loads, and a link verified against it is a TLS endpoint."""
        ca, _, _ = make_ca(tmp_path)
        trust = load_ca(str(ca))
        endpoint = client_endpoint(MemoryReactorClock(), "127.0.0.1", 11212, 5.0, trust)
        assert not isinstance(endpoint, HostnameEndpoint)
        assert type(endpoint).__name__ == "_WrapperEndpoint"
        assert https_policy(trust) is not None

    @pytest.mark.parametrize("content", [None, b"", b"not a certificate\n", b"-----BEGIN CERTIFICATE-----\nAAAA\n"])
    def test_bad_ca_stops_the_daemon_with_one_line(self, tmp_path: Path, content: bytes | None) -> None:
        """A missing file, one without a certificate or a broken one: one line naming --tls-ca, exit."""
        from chashd.kvstore.tap import Options

        path = tmp_path / "ca.pem"
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ConfigError, match="--tls-ca"):
            load_ca(str(path))
        options = Options()
        with pytest.raises(SystemExit) as info:
            options.parseOptions(
                ["--node-id", "kv", "--engine", "memory", "--port", "tcp:0:interface=127.0.0.1"]
                + ["--line-port", "tcp:0:interface=127.0.0.1", "--tls-ca", str(path)]
            )
        assert isinstance(info.value.code, str) and info.value.code.startswith("chash-kvstore: error: --tls-ca")
        assert "\n" not in info.value.code
