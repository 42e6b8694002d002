# -*- test-case-name: tests.unit.test_memcache_server,tests.unit.test_memcache_client,tests.unit.test_transport -*-
"""What the line protocol's server and client connections both do to their transport."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from typing import Any

from twisted.internet.tcp import Connection

__all__ = ["set_nodelay", "writer"]


def set_nodelay(transport: Any) -> None:
    """Send small writes at once: with Nagle's algorithm and the peer's delayed ACKs a reply or a request
    could wait up to 40 ms. A transport without the option (a UNIX socket) is left alone."""
    set_option = getattr(transport, "setTcpNoDelay", None)
    if set_option is not None:
        with suppress(OSError):  # a UNIX socket has no Nagle
            set_option(True)


#: The attributes of Twisted's socket transport (``twisted.internet.abstract.FileDescriptor``, not part of its
#: public API) that ``writer`` reads: a Twisted without one of them gets the plain ``write``.
_INTERNALS = (
    "_tempDataBuffer", "dataBuffer", "offset", "TLS", "disconnecting", "_writeDisconnecting",
    "_writeDisconnected", "connected", "writeSomeData",
)  # fmt: skip


def writer(transport: Any) -> Callable[[bytes], object]:
    """A ``write`` for ``transport`` that sends at once when nothing waits in its buffer.

    Twisted's ``write`` only buffers: it registers the socket for writability (an ``epoll_ctl``), the
    reactor's next turn dispatches the event and sends, then unregisters it (another ``epoll_ctl``). For a
    reply that is all a connection has to send (a client with one request in flight), sending it now is one
    system call instead of three and a dispatch. For a plain TCP or UNIX connection of Twisted's reactors
    with an empty buffer, the returned function sends what the socket takes and buffers the rest with
    ``write``; anything else (data already buffered, TLS, a connection closing or closed, another transport,
    a Twisted whose transport lacks one of the ``_INTERNALS`` it reads)
    goes through ``write`` as before, so the bytes keep their order and a failed send is found and reported
    by the reactor as usual.
    """
    if not isinstance(transport, Connection) or not all(hasattr(transport, name) for name in _INTERNALS):

        def write_later(data: bytes) -> None:
            transport.write(data)  # looked up at each call: tests replace a transport's write

        return write_later
    t: Any = transport  # Twisted's socket transports are not annotated

    def write_now(data: bytes) -> None:
        if (
            t._tempDataBuffer
            or len(t.dataBuffer) > t.offset
            or t.TLS
            or t.disconnecting
            or t._writeDisconnecting
            or t._writeDisconnected
            or not t.connected
            or not data
        ):
            t.write(data)
            return
        sent = t.writeSomeData(data)
        if type(sent) is not int:  # the connection is lost: the reactor's doWrite finds it again and closes
            t.write(data)
        elif sent < len(data):
            t.write(data[sent:])

    return write_now
