# -*- test-case-name: tests.unit.test_security -*-
"""The limits of the HTTP listener both roles serve: connections, idle and slow clients.

- ``LimitedSite`` holds at most ``max_connections`` connections. At the limit, the connection idle longest
  (no request under way, nothing received for ``EVICT_IDLE`` seconds or more) is closed to make room
  (``idle_evicted``), so that idle connections cannot lock new clients out; when no connection is idle, the
  new one is answered 503 problem+json and closed (``rejected_connections``).
- A connection idle ``idle_timeout`` seconds between requests is closed (twisted.web's own timeout).
- A request must arrive whole (request line, headers and body) within ``client_timeout`` seconds of its
  first byte: a client that trickles its headers, or never finishes a chunked body, is cut
  (``slow_closed``). twisted.web's idle timeout alone restarts at every byte.
- An answer sent before the request was read whole (413 for a body over the limit, the 503 above) is
  followed by a lingering close (``LimitedChannel.discard``): the write side is shut, what the client still
  sends is read and dropped for at most ``LINGER`` seconds, then the connection is closed. Closing at once
  with unread bytes makes the kernel send a reset, which can destroy the answer before the client reads it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Site

__all__ = ["EVICT_IDLE", "LINGER", "LimitedChannel", "LimitedSite", "problem_bytes"]

#: Seconds a connection must have been idle before it may be closed to make room for a new one.
EVICT_IDLE = 1.0
#: Seconds an answered connection keeps reading (and dropping) what its client still sends.
LINGER = 2.0

_log = Logger()


def problem_bytes(code: int, reason: bytes, body: bytes, extra_headers: bytes = b"") -> bytes:
    """A whole HTTP/1.1 answer with a problem+json ``body`` that closes the connection."""
    head = b"HTTP/1.1 %d %s\r\nContent-Type: application/problem+json\r\n" % (code, reason)
    return head + b"Content-Length: %d\r\n" % len(body) + extra_headers + b"Connection: close\r\n\r\n" + body


def _linger(transport: Any, call_later: Any) -> IDelayedCall | None:
    """Shut the write side of ``transport`` once what was written is sent, and close it after ``LINGER``
    seconds at the latest; the delayed call (None when the transport cannot half-close)."""
    lose_write = getattr(transport, "loseWriteConnection", None)
    if lose_write is None:
        transport.loseConnection()
        return None
    lose_write()
    return call_later(LINGER, transport.abortConnection)  # type: ignore[no-any-return]


class LimitedChannel(HTTPChannel):
    """An ``HTTPChannel`` that keeps its site's counts and limits (see the module docstring)."""

    site: LimitedSite
    _deadline: IDelayedCall | None = None
    _linger: IDelayedCall | None = None
    _discarding = False
    _busy = False  # a whole request was received and its answer is not finished
    last_seen = 0.0

    @property
    def idle(self) -> bool:
        """No request under way (neither arriving nor being answered)."""
        return not self._busy and self._deadline is None and not self._discarding

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]  # twisted.web is not annotated
        self.last_seen = self.site.seconds()

    def dataReceived(self, data: bytes) -> None:
        if self._discarding:
            return
        site = self.site
        self.last_seen = site.seconds()
        if self._deadline is None and not self._busy and site.client_timeout > 0:
            self._deadline = self.callLater(site.client_timeout, self._too_slow)  # type: ignore[no-untyped-call]  # twisted.web is not annotated
        super().dataReceived(data)  # type: ignore[no-untyped-call]  # twisted.web is not annotated

    def lineReceived(self, line: bytes) -> None:
        if not self._discarding:  # an answer was sent before the request was whole: the rest is dropped
            super().lineReceived(line)  # type: ignore[no-untyped-call]  # twisted.web is not annotated

    def rawDataReceived(self, data: bytes) -> None:
        if not self._discarding:
            super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        if self._discarding:
            return
        self._busy = True
        super().allContentReceived()  # type: ignore[no-untyped-call]  # twisted.web is not annotated

    def requestDone(self, request: Any) -> None:
        self._busy = False
        self.last_seen = self.site.seconds()
        super().requestDone(request)  # type: ignore[no-untyped-call]  # twisted.web is not annotated

    def discard(self) -> None:
        """The answer is written before the request was read whole: drop what follows, then close."""
        self._discarding = True
        self._cancel_deadline()
        if self.transport is not None:
            self._linger = _linger(self.transport, self.callLater)

    def evict(self) -> None:
        """Close this idle connection to make room for a new one."""
        self._discarding = True
        if self.transport is not None:
            self.transport.loseConnection()

    def _too_slow(self) -> None:
        self._deadline = None
        site = self.site
        site.slow_closed += 1
        _log.info(
            "closing a connection from {peer}: no whole request within {timeout}s",
            peer=str(self.transport.getPeer()) if self.transport is not None else "?",
            timeout=site.client_timeout,
        )
        self._discarding = True
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_deadline()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        self.site.channels.discard(self)
        super().connectionLost(reason)  # type: ignore[no-untyped-call]  # twisted.web is not annotated


class _TooManyConnections(Protocol):
    """Answers 503 and closes (lingering): the site holds ``max_connections`` connections, none idle."""

    def __init__(self, site: LimitedSite) -> None:
        self._site = site
        self._linger: IDelayedCall | None = None

    def connectionMade(self) -> None:
        body = b'{"detail": "too many open connections; try again later", "status": 503, '
        body += b'"title": "Service Unavailable", "type": "about:blank"}\n'
        assert self.transport is not None
        self.transport.write(problem_bytes(503, b"Service Unavailable", body, b"Retry-After: 1\r\n"))
        self._linger = _linger(self.transport, self._site.reactor.callLater)

    def dataReceived(self, data: bytes) -> None:
        """Dropped: the connection is refused."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()


class LimitedSite(Site):
    """A ``Site`` that keeps at most ``max_connections`` connections, closes idle ones after ``idle_timeout``
    seconds (0: never) and cuts a client that takes more than ``client_timeout`` seconds (0: never) to send
    a request. Counts ``curr_connections``, ``total_connections``, ``rejected_connections``, ``idle_evicted``
    and ``slow_closed`` (read by ``chashd.metrics.ConnectionsCollector``)."""

    protocol = LimitedChannel  # type: ignore[assignment]  # HTTP/1.1 only: no HTTP/2 negotiation here

    def __init__(
        self,
        resource: IResource,
        max_connections: int = 1024,
        idle_timeout: float = 600.0,
        client_timeout: float = 30.0,
        reactor: Any = None,
    ) -> None:
        super().__init__(resource, timeout=idle_timeout or None, reactor=reactor)  # type: ignore[no-untyped-call]  # twisted.web is not annotated
        self.max_connections = max_connections
        self.client_timeout = client_timeout
        self.channels: set[LimitedChannel] = set()
        self.total_connections = 0
        self.rejected_connections = 0
        self.idle_evicted = 0
        self.slow_closed = 0

    @property
    def curr_connections(self) -> int:
        """Open connections."""
        return len(self.channels)

    def seconds(self) -> float:
        """The reactor's time."""
        return float(self.reactor.seconds())

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if len(self.channels) >= self.max_connections and not self._evict_one():
            self.rejected_connections += 1
            _log.warn("refusing an HTTP connection: {count} open", count=len(self.channels))
            return _TooManyConnections(self)
        channel = super().buildProtocol(addr)  # type: ignore[no-untyped-call]  # twisted.web is not annotated
        self.channels.add(channel)
        self.total_connections += 1
        return channel

    def _evict_one(self) -> bool:
        """Close the connection idle longest, if one has been idle ``EVICT_IDLE`` seconds; True if one was."""
        now = self.seconds()
        idle = [c for c in self.channels if c.idle and now - c.last_seen >= EVICT_IDLE]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.last_seen)
        self.channels.discard(victim)
        self.idle_evicted += 1
        _log.info("closing an HTTP connection idle for {idle:.0f}s to make room", idle=now - victim.last_seen)
        victim.evict()
        return True
