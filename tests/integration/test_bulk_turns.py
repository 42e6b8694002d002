"""A kvstore's line server serves the requests that came during a bulk page before it runs the next page.

The order is the reactor's: the calls due run, then a poll dispatches what the sockets brought. A ``Clock``
runs zero-delay calls one after the other without a poll between, so this runs the real reactor with real
loopback sockets: a page applied, a ``get`` arriving on another connection meanwhile, and a second page that
was read with the first.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable, Sequence
from typing import Any

import pytest_twisted
from twisted.internet.threads import deferToThread

from chashd.bulk import BulkRow, encode_rows
from chashd.commands import XBulk
from chashd.kvstore.backend import LocalBackend
from chashd.memcache.server import MemcacheServerFactory, MemcacheServerProtocol
from chashd.memcache.text import serialize_command
from chashd.storage import MemoryEngine

TIMEOUT = 10.0
CLOCK = 1_700_000_000_000 << 16  # a version's clock: milliseconds, 16 bits of counter


class RecordingEngine(MemoryEngine):
    """A memory engine that records its pages and reads, and runs ``during_first_page`` inside the first
    page's apply (on the reactor thread, as the page's turn does)."""

    def __init__(self, during_first_page: Callable[[], None]) -> None:
        super().__init__()
        self.events: list[tuple[str, Any]] = []
        self._during_first_page = during_first_page

    def apply_rows(self, rows: Sequence[BulkRow]) -> list[bool]:
        self.events.append(("page", len(rows)))
        if len(self.events) == 1:
            self._during_first_page()
        return super().apply_rows(rows)

    def get_live(self, key: bytes, now: float) -> tuple[int, bytes] | None:
        self.events.append(("get", key))
        return super().get_live(key, now)


class RecordingFactory(MemcacheServerFactory):
    """Keeps the protocols it builds, in the order the connections came."""

    built: list[MemcacheServerProtocol]

    def buildProtocol(self, addr: Any) -> MemcacheServerProtocol:
        protocol = super().buildProtocol(addr)
        self.built.append(protocol)
        return protocol


def page(count: int, prefix: bytes) -> bytes:
    rows = [(prefix + b"%d" % i, b"v", 0, 0, CLOCK, "w", 0) for i in range(count)]
    return serialize_command(XBulk(*encode_rows(rows)))


def ask(sock: socket.socket, request: bytes, end: bytes, count: int = 1) -> bytes:
    """Send ``request``, then what ``sock`` brings until ``end`` came ``count`` times (in a thread: the
    socket blocks)."""
    sock.sendall(request)
    return read_until(sock, end, count)


def read_until(sock: socket.socket, end: bytes, count: int = 1) -> bytes:
    """What ``sock`` brings until ``end`` came ``count`` times."""
    data = b""
    while data.count(end) < count:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


@pytest_twisted.inlineCallbacks
def test_a_read_that_came_during_a_page_goes_before_the_next_page() -> Any:
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    reader_side: list[int] = []  # the server's socket of the reading client

    def send_a_read() -> None:
        """During the first page: a client's get, in the server's socket before the page's turn ends."""
        reader.sendall(b"get k1\r\n")
        readable, _, _ = select.select(reader_side, [], [], TIMEOUT)
        assert readable, "the get never reached the server's socket"

    engine = RecordingEngine(send_a_read)
    factory = RecordingFactory(LocalBackend(engine, "n1", reactor, 1024 * 1024), reactor, idle_timeout=0)
    factory.built = []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    address = ("127.0.0.1", port.getHost().port)
    reader = socket.create_connection(address, timeout=TIMEOUT)
    sender = socket.create_connection(address, timeout=TIMEOUT)
    try:
        # Both connections accepted (one round trip each), the reader's first.
        assert (yield deferToThread(ask, reader, b"version\r\n", b"\r\n")).startswith(b"VERSION ")
        assert (yield deferToThread(ask, sender, b"version\r\n", b"\r\n")).startswith(b"VERSION ")
        transport: Any = factory.built[0].transport
        reader_side.append(transport.fileno())
        # Two pages in one write: the second is read with the first.
        answers = yield deferToThread(ask, sender, page(2, b"k") + page(3, b"j"), b"XBULKED", 2)
        assert answers == b"XBULKED 2 0\r\nXBULKED 3 0\r\n"
        reply = yield deferToThread(read_until, reader, b"END\r\n")
        assert reply.startswith(b"VALUE k1 ") and reply.endswith(b"END\r\n")
        assert engine.events == [("page", 2), ("get", b"k1"), ("page", 3)]
    finally:
        reader.close()
        sender.close()
        yield port.stopListening()
