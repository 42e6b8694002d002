"""chashd.memcache._transport.writer: a write that sends at once when nothing waits in the transport's buffer,
on Twisted's own socket transport over a local socket pair (no network, no running reactor: the transport's
reactor is a MemoryReactor, whose ``writers`` say whether the write was left to the reactor)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from twisted.internet import abstract, unix
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport

from chashd.kvstore.backend import LocalBackend
from chashd.memcache._transport import writer
from chashd.memcache.server import MemcacheServerFactory
from chashd.storage.memory import MemoryEngine


class _Pair:
    """A Twisted server transport on one end of a socket pair; the test reads the other end."""

    def __init__(self, protocol: Protocol) -> None:
        self.ours, self.peer = socket.socketpair()
        self.peer.setblocking(False)
        self.reactor = MemoryReactor()
        # A UNIX connection is Twisted's TCP connection with UNIX addresses (unix.Server subclasses tcp.Server).
        self.transport = unix.Server(self.ours, protocol, "", None, 1, self.reactor)

    def received(self) -> bytes:
        """What reached the peer so far."""
        chunks = []
        while True:
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.ours.close()
        self.peer.close()


@pytest.fixture
def pair() -> Iterator[_Pair]:
    made = _Pair(Protocol())
    yield made
    made.close()


class WriterTests:
    """What the write does, and when it leaves the bytes to the reactor as ``write`` does."""

    def test_sends_at_once_with_an_empty_buffer(self, pair: _Pair) -> None:
        """Nothing buffered: the bytes are sent now, and the socket is not handed to the reactor for writing."""
        write = writer(pair.transport)
        write(b"END\r\n")
        assert pair.received() == b"END\r\n"
        assert pair.transport not in pair.reactor.writers

    def test_queues_behind_buffered_bytes(self, pair: _Pair) -> None:
        """Bytes already buffered by ``write``: the new ones go behind them (order kept), sent by the reactor."""
        write = writer(pair.transport)
        pair.transport.write(b"one ")
        write(b"two")
        assert pair.received() == b""
        assert pair.transport in pair.reactor.writers
        pair.transport.doWrite()
        assert pair.received() == b"one two"

    def test_a_partial_send_buffers_the_rest(self, pair: _Pair) -> None:
        """More than the socket takes: what it took is sent, the rest is buffered and sent by the reactor, in
        order, and writes after it queue behind it."""
        write = writer(pair.transport)
        big = bytes(range(256)) * 16_000  # 4 MB, more than a socket buffer
        write(big)
        write(b"after")
        assert pair.transport in pair.reactor.writers
        got = [pair.received()]
        assert 0 < len(got[0]) < len(big)
        for _ in range(10_000):  # bounded: each round moves at least a socket buffer
            if pair.transport not in pair.reactor.writers:
                break
            pair.transport.doWrite()
            got.append(pair.received())
        assert b"".join(got) == big + b"after"

    def test_closing_connection_uses_write(self, pair: _Pair) -> None:
        """A connection being closed gets its bytes through ``write`` (sent before the close, by the reactor)."""
        write = writer(pair.transport)
        pair.transport.write(b"first ")
        pair.transport.loseConnection()
        write(b"last")
        assert pair.received() == b""
        pair.transport.doWrite()
        assert pair.received() == b"first last"

    def test_other_transports_keep_their_write(self) -> None:
        """A transport that is not one of Twisted's socket connections (here a StringTransport) is written
        with its own ``write``."""
        transport = StringTransport()
        writer(transport)(b"END\r\n")
        assert transport.value() == b"END\r\n"

    def test_a_twisted_without_the_internals_keeps_write(self, pair: _Pair, monkeypatch: pytest.MonkeyPatch) -> None:
        """A Twisted whose socket transport lacks an attribute the write reads (they are not public API) gets
        ``write``: the bytes wait for the reactor instead of failing the reply."""
        monkeypatch.delattr(abstract.FileDescriptor, "_writeDisconnecting")
        writer(pair.transport)(b"END\r\n")
        assert pair.received() == b""
        assert pair.transport in pair.reactor.writers
        monkeypatch.undo()  # Twisted's own doWrite reads the attribute
        pair.transport.doWrite()
        assert pair.received() == b"END\r\n"


class ServerWritesTests:
    """The line protocol's server sends a reply at once when it is all the connection has to send."""

    def test_reply_sent_at_once(self) -> None:
        """A get on a kvstore connection: the reply reaches the client without a turn of the reactor."""
        clock = Clock()
        factory = MemcacheServerFactory(LocalBackend(MemoryEngine(), "n1", clock, 100), clock, idle_timeout=0)
        protocol = factory.buildProtocol(None)
        made = _Pair(protocol)
        try:
            protocol.makeConnection(made.transport)
            protocol.dataReceived(b"set k 0 0 1\r\nv\r\n")
            protocol.dataReceived(b"get k\r\n")
            assert made.received() == b"STORED\r\nVALUE k 0 1\r\nv\r\nEND\r\n"
            assert made.transport not in made.reactor.writers
        finally:
            made.close()
