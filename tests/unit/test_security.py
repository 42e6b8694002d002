"""What answers to clients never carry: absolute paths, stack traces, secrets. The logs keep
the detail."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from chashd.kvstore.backend import LocalBackend
from chashd.memcache.server import MemcacheServerFactory
from chashd.storage.memory import MemoryEngine
from chashd.storage.sqlite import SQLiteEngine
from chashd.web import KeyValueHTTP

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
