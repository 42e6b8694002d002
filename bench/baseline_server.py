"""The benchmark's baseline: a minimal Twisted server of memcached's get/set over a dict.

    python bench/baseline_server.py PORT

It speaks just what the load uses (``get <key>*`` and ``set <key> <flags> <exptime> <bytes>``), the
way one would write it in a few lines with ``LineReceiver``: what a memcached-speaking Twisted server
costs before any of chashd's work (parsing every command of the protocol, versions, expiry, counters,
an engine). bench/kvstore.py compares the kvstore with it.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver

__all__ = ["BaselineProtocol", "main"]


class BaselineProtocol(LineReceiver):
    """get/set over a shared dict of ``key -> (flags, value)``."""

    delimiter = b"\r\n"
    MAX_LENGTH = 2048

    def __init__(self, store: dict[bytes, tuple[int, bytes]]) -> None:
        self.store = store
        self._pending: tuple[bytes, int, int] | None = None
        self._data = b""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)

    def lineReceived(self, line: bytes) -> None:
        parts = line.split()
        if parts and parts[0] == b"get":
            out = []
            for key in parts[1:]:
                item = self.store.get(key)
                if item is not None:
                    out.append(b"VALUE %s %d %d\r\n%s\r\n" % (key, item[0], len(item[1]), item[1]))
            out.append(b"END\r\n")
            self.transport.write(b"".join(out))  # type: ignore[union-attr]
        elif parts and parts[0] == b"set" and len(parts) >= 5:
            self._pending = (parts[1], int(parts[2]), int(parts[4]))
            self._data = b""
            self.setRawMode()
        else:
            self.transport.write(b"ERROR\r\n")  # type: ignore[union-attr]

    def rawDataReceived(self, data: bytes) -> None:
        assert self._pending is not None
        key, flags, size = self._pending
        self._data += data
        if len(self._data) < size + 2:
            return
        value, rest = self._data[:size], self._data[size + 2 :]
        self.store[key] = (flags, value)
        self._pending = None
        self._data = b""
        self.transport.write(b"STORED\r\n")  # type: ignore[union-attr]
        self.setLineMode(rest)


class BaselineFactory(Factory):
    """One dict for every connection."""

    def __init__(self) -> None:
        self.store: dict[bytes, tuple[int, bytes]] = {}

    def buildProtocol(self, addr: Any) -> BaselineProtocol:
        return BaselineProtocol(self.store)


def main() -> None:
    """Serve on 127.0.0.1:PORT until killed."""
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    reactor.listenTCP(int(sys.argv[1]), BaselineFactory(), interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
