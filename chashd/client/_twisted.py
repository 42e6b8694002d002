"""The client for Twisted code (``AsyncKVStoreClient``, on treq) and ``http_client``, the treq client every
daemon makes its outbound HTTP requests with.

Each call tries the servers it was given once each, in turn, starting with the one that answered last;
whether and when to call again is the caller's choice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import treq
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.error import ConnectionRefusedError as Refused
from twisted.internet.error import TimeoutError as Timeout
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.iweb import IPolicyForHTTPS

from chashd.client._api import (
    Call,
    ChashError,
    Item,
    Operations,
    Response,
    Unreachable,
    error_for,
    gateway_urls,
    hash_ring,
)
from chashd.ring import HashRing

__all__ = ["AsyncKVStoreClient", "http_client"]

T = TypeVar("T")


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False


def http_client(reactor: Any, connect_timeout: float = 5.0, tls: IPolicyForHTTPS | None = None) -> HTTPClient:
    """A treq client whose pool keeps up to 4 connections per server open and logs no line per connection.

    ``tls`` decides how ``https`` URLs are checked (Twisted's ``BrowserLikePolicyForHTTPS`` when None).
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    # Twisted has no public way to choose the pool's factory; without this, a line per connection is logged.
    pool._factory = _QuietClientFactory
    pool.maxPersistentPerHost = 4
    if tls is None:
        return HTTPClient(Agent(reactor, connectTimeout=connect_timeout, pool=pool))
    return HTTPClient(Agent(reactor, contextFactory=tls, connectTimeout=connect_timeout, pool=pool))


class AsyncKVStoreClient:
    """The operations of ``KVStoreClient`` for Twisted code, on treq: each returns a Deferred.

    ``reactor_or_treq``: a reactor (a persistent, quiet treq client is made on it: ``http_client``, with
    ``tls`` for ``https`` URLs) or a treq ``HTTPClient`` (or ``treq.testing.StubTreq``). ``reactor``: the
    clock for timeouts when a treq client is given (default: the global reactor, imported only then).
    ``token`` goes on every call that needs the cluster's token.

    Cancelling the Deferred of a call cancels the request under way and asks no other server.
    """

    def __init__(
        self,
        reactor_or_treq: Any,
        gateways: str | Sequence[str] | None = None,
        timeout: float = 5.0,
        token: str | None = None,
        reactor: Any = None,
        tls: IPolicyForHTTPS | None = None,
    ) -> None:
        self._pool: HTTPConnectionPool | None = None
        if hasattr(reactor_or_treq, "request"):
            if tls is not None:
                raise ValueError("tls is for the client made on a reactor; a treq client brings its own")
            self._treq = reactor_or_treq
            self._reactor = reactor
        else:
            self._reactor = reactor_or_treq
            self._treq = http_client(reactor_or_treq, connect_timeout=timeout, tls=tls)
            self._pool = self._treq._agent._pool
        self.urls = gateway_urls(gateways)
        self.timeout = timeout
        self._ops = Operations(token)
        self._preferred = 0

    @property
    def preferred_url(self) -> str:
        """The URL asked first by the next call: the one that answered last."""
        return self.urls[self._preferred]

    def close(self) -> Deferred[None]:
        """Close the persistent connections this client opened (none when it was given a treq client)."""
        if self._pool is None:
            return succeed(None)
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed

    def put(
        self,
        key: str | bytes,
        value: bytes | str,
        ttl: int | None = None,
        flags: int = 0,
        cas: int | None = None,
        only_if_absent: bool = False,
    ) -> Deferred[None]:
        """Store ``value``; see ``KVStoreClient.put``."""
        return self._call_safely(lambda: self._ops.put(key, value, ttl, flags, cas, only_if_absent))

    def get(self, key: str | bytes) -> Deferred[bytes | None]:
        """The value of ``key``, or None."""
        d = self.get_item(key)
        return d.addCallback(lambda item: item.value if item is not None else None)

    def get_item(self, key: str | bytes) -> Deferred[Item | None]:
        """The value with its flags, version and expiry, or None."""
        return self._call_safely(lambda: self._ops.get(key))

    def delete(self, key: str | bytes) -> Deferred[bool]:
        """Delete ``key``; False when it had no value."""
        return self._call_safely(lambda: self._ops.delete(key))

    def lookup(self, key: str | bytes) -> Deferred[dict[str, Any]]:
        """The key's preference list."""
        return self._call_safely(lambda: self._ops.lookup(key))

    def ring(self, after: int | None = None, wait: float | None = None) -> Deferred[dict[str, Any]]:
        """The ring's JSON form; with ``after``, a long poll for the next epoch."""
        return self._call_safely(lambda: self._ops.ring(after, wait))

    def hash_ring(self) -> Deferred[HashRing]:
        """The ring as a ``HashRing``."""
        return self.ring().addCallback(hash_ring)

    def placement(self, known: str | None = None, wait: float | None = None) -> Deferred[dict[str, Any]]:
        """The routing a gateway's data plane follows (``GET /ring/placement``); see
        ``KVStoreClient.placement``."""
        return self._call_safely(lambda: self._ops.placement(known, wait))

    def status(self) -> Deferred[dict[str, Any]]:
        """``GET /ring/status``."""
        return self._call_safely(self._ops.status)

    def nodes(self) -> Deferred[list[dict[str, Any]]]:
        """Every node of the cluster map."""
        return self._call_safely(self._ops.nodes)

    def node(self, node_id: str) -> Deferred[dict[str, Any]]:
        """One node of the map."""
        return self._call_safely(lambda: self._ops.node(node_id))

    def drain(self, node_id: str) -> Deferred[dict[str, Any]]:
        """Mark the node ``leaving``."""
        return self._call_safely(lambda: self._ops.drain(node_id))

    def remove(self, node_id: str) -> Deferred[dict[str, Any]]:
        """Remove the node from the map."""
        return self._call_safely(lambda: self._ops.remove(node_id))

    def health(self) -> Deferred[dict[str, Any]]:
        """``GET /health`` of the first server that answers."""
        return self._call_safely(self._ops.health)

    def register(self, announcement: Mapping[str, Any]) -> Deferred[dict[str, Any]]:
        """Announce a kvstore node (``POST /ring/nodes``); see ``KVStoreClient.register``."""
        return self._call_safely(lambda: self._ops.register(announcement))

    # -- transport ----------------------------------------------------------------------------------

    def _call_safely(self, build: Callable[[], Call[T]]) -> Deferred[T]:
        """A bad argument fails the Deferred (it is not raised), as callers of Deferred APIs expect."""
        try:
            call = build()
        except ChashError:
            failed: Deferred[T] = Deferred()
            failed.errback(Failure())
            return failed
        return self._call(call)

    def _call(self, call: Call[T]) -> Deferred[T]:
        errors: dict[str, str] = {}
        count = len(self.urls)
        start = self._preferred
        unavailable: list[Response] = []
        sending: list[Deferred[Response]] = []  # the request under way is the last
        cancelled: list[bool] = []

        def cancel(_: Deferred[T]) -> None:
            cancelled.append(True)
            sending[-1].cancel()

        result: Deferred[T] = Deferred(cancel)

        def attempt(i: int) -> None:
            if i == count:
                result.errback(error_for(unavailable[-1]) if unavailable else Unreachable(errors))
                return
            index = (start + i) % count
            base = self.urls[index]

            def answered(response: Response) -> None:
                if response.status == 503:
                    unavailable.append(response)
                    errors[base] = f"503 {error_for(response).detail}"
                    attempt(i + 1)
                    return
                self._preferred = index
                try:
                    value = call.parse(response)
                except Exception:  # a ChashError, or a bug: either way the caller's Deferred gets it
                    result.errback(Failure())
                else:
                    result.callback(value)

            def failed(failure: Failure) -> None:
                if cancelled:  # the caller gave up: ask no one else (``result`` fails with CancelledError)
                    return
                errors[base] = _reason(failure)
                attempt(i + 1)

            sending.append(self._send(base, call))
            sending[-1].addCallbacks(answered, failed)

        attempt(0)
        return result

    def _send(self, base: str, call: Call[Any]) -> Deferred[Response]:
        url = base + call.path
        kwargs: dict[str, Any] = {
            "headers": dict(call.headers),
            "timeout": self.timeout + call.extra_time,
            "allow_redirects": False,
        }
        if call.body is not None:
            kwargs["data"] = call.body
        if self._reactor is not None:
            kwargs["reactor"] = self._reactor
        # maybeDeferred: treq raises at once for some URLs (an IPv6 literal: hyperlink's issue #188).
        d: Deferred[Any] = maybeDeferred(self._treq.request, call.method, url, **kwargs)

        def read(response: Any) -> Deferred[Response]:
            headers = {
                name.decode("latin-1").lower(): values[0].decode("latin-1")
                for name, values in response.headers.getAllRawHeaders()
            }
            body: Deferred[bytes] = treq.content(response)
            return body.addCallback(lambda data: Response(url, response.code, headers, data))

        return d.addCallback(read)


def _reason(failure: Failure) -> str:
    """A few words for why a request got no answer."""
    if failure.check(CancelledError, Timeout):
        return "timed out"
    if failure.check(Refused):
        return "connection refused"
    reasons = getattr(failure.value, "reasons", None)  # ResponseFailed and friends wrap their causes
    if reasons:
        return "; ".join(_reason(r) if isinstance(r, Failure) else str(r) for r in reasons)
    return str(failure.value) or (failure.type.__name__ if failure.type is not None else "failed")
