"""The gateway benchmark's baseline: a minimal Twisted get/set proxy over one pipelined backend connection.

    python bench/proxy_baseline.py LISTEN_PORT BACKEND_PORT

A ``LineReceiver`` server on 127.0.0.1:LISTEN_PORT that forwards each ``get <key>*`` and
``set <key> <flags> <exptime> <bytes>`` (with its data block) unchanged to one backend that speaks the
memcached text protocol at 127.0.0.1:BACKEND_PORT (a memcached or a kvstore), multiplexing every client
connection over ONE backend connection: requests are written to it as they come (pipelined), and since
the backend answers in order, a queue of ``(client, kind)`` says whose each reply is; the reply's bytes go
back to that client unchanged, so each client gets its replies in order. This is what a proxy costs in
Twisted before any routing, versions or replication: bench/gateway.py compares the gateway with it.
Nothing else of the protocol is spoken (another command gets ``ERROR``), and there is no flow control,
timeout or reconnection: the process exits when the backend connection closes.
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.basic import LineReceiver

__all__ = ["BackendProtocol", "ProxyFactory", "ProxyProtocol", "main"]

_GET, _SET = 0, 1


def _nodelay(transport: Any) -> None:
    if hasattr(transport, "setTcpNoDelay"):
        transport.setTcpNoDelay(True)


class BackendProtocol(Protocol):
    """The one connection to the backend: requests written in order, replies handed back in order."""

    def __init__(self) -> None:
        self.waiting: deque[tuple[ProxyProtocol, int]] = deque()
        self._buf = b""

    def connectionMade(self) -> None:
        _nodelay(self.transport)

    def request(self, client: ProxyProtocol, kind: int, data: bytes) -> None:
        """Send ``data`` for ``client``; its reply goes back to ``client``."""
        self.waiting.append((client, kind))
        self.transport.write(data)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos = 0
        waiting = self.waiting
        while waiting:
            client, kind = waiting[0]
            if kind == _SET:  # one line: STORED, NOT_STORED, an error
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                end += 2
            else:  # VALUE <key> <flags> <bytes>\r\n<data>\r\n ... END\r\n (or one error line)
                end = self._get_reply_end(buf, pos)
                if end < 0:
                    break
            waiting.popleft()
            client.reply(buf[pos:end])
            pos = end
        self._buf = buf[pos:] if pos < len(buf) else b""

    @staticmethod
    def _get_reply_end(buf: bytes, pos: int) -> int:
        """Where the get reply starting at ``pos`` ends, or -1 while it is incomplete."""
        while True:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                return -1
            if buf.startswith(b"VALUE ", pos):
                size = int(buf[pos:end].split(b" ")[3])  # VALUE <key> <flags> <bytes> [<cas>]
                pos = end + 2 + size + 2
                if pos > len(buf):
                    return -1
                continue
            return end + 2  # END, or an error line

    def connectionLost(self, reason: Any = None) -> None:
        from twisted.internet import reactor

        reactor.stop()


class ProxyProtocol(LineReceiver):
    """One client connection: get lines and set requests forwarded over the shared backend connection."""

    delimiter = b"\r\n"
    MAX_LENGTH = 2048

    def __init__(self, backend: BackendProtocol) -> None:
        self.backend = backend
        self._set_line = b""
        self._size = 0
        self._data = b""
        self.gone = False

    def connectionMade(self) -> None:
        _nodelay(self.transport)

    def connectionLost(self, reason: Any = None) -> None:
        self.gone = True

    def reply(self, data: bytes) -> None:
        """A backend reply for this client."""
        if not self.gone:
            self.transport.write(data)  # type: ignore[union-attr]

    def lineReceived(self, line: bytes) -> None:
        if line.startswith(b"get "):
            self.backend.request(self, _GET, line + b"\r\n")
        elif line.startswith(b"set "):
            parts = line.split(b" ")
            if len(parts) < 5 or not parts[4].isdigit():
                self.transport.write(b"CLIENT_ERROR bad command line format\r\n")  # type: ignore[union-attr]
                return
            self._set_line = line + b"\r\n"
            self._size = int(parts[4]) + 2
            self._data = b""
            self.setRawMode()
        else:
            self.transport.write(b"ERROR\r\n")  # type: ignore[union-attr]

    def rawDataReceived(self, data: bytes) -> None:
        self._data += data
        if len(self._data) < self._size:
            return
        block, rest = self._data[: self._size], self._data[self._size :]
        self._data = b""
        self.backend.request(self, _SET, self._set_line + block)
        self.setLineMode(rest)


class ProxyFactory(Factory):
    """Every client connection shares ``backend``."""

    def __init__(self, backend: BackendProtocol) -> None:
        self.backend = backend

    def buildProtocol(self, addr: Any) -> ProxyProtocol:
        return ProxyProtocol(self.backend)


def main() -> None:
    """Connect to the backend, then serve on 127.0.0.1:LISTEN_PORT until the backend goes away."""
    from twisted.internet import reactor as _reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    reactor: Any = _reactor
    listen_port, backend_port = int(sys.argv[1]), int(sys.argv[2])
    backend = BackendProtocol()

    def connected(_: Any) -> None:
        reactor.listenTCP(listen_port, ProxyFactory(backend), interface="127.0.0.1")

    def failed(failure: Any) -> None:
        sys.stderr.write(f"cannot connect to the backend on port {backend_port}: {failure.getErrorMessage()}\n")
        reactor.stop()

    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", backend_port, timeout=10)
    connectProtocol(endpoint, backend).addCallbacks(connected, failed)
    reactor.run()


if __name__ == "__main__":
    main()
