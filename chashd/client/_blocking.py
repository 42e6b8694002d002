"""The blocking client, on the standard library's ``http.client`` (no Twisted)."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from chashd.client._api import (
    Call,
    Item,
    Operations,
    Response,
    Unreachable,
    error_for,
    gateway_urls,
    hash_ring,
)
from chashd.ring import HashRing

__all__ = ["KVStoreClient"]

T = TypeVar("T")


class _ConnectionFailed(Exception):
    """The request did not get an answer from this URL (refused, reset, timed out, not HTTP)."""


class KVStoreClient:
    """A blocking client for scripts; see the module docstring.

    ``gateways``: a URL, a comma-separated list, or a sequence of URLs; None reads ``$CHASH_GATEWAY``, else
    ``http://127.0.0.1:8000``. ``timeout``: seconds to connect and for each answer. ``token``: sent as
    ``Authorization: Bearer`` on node admin (drain, remove).
    """

    def __init__(
        self, gateways: str | Sequence[str] | None = None, timeout: float = 5.0, token: str | None = None
    ) -> None:
        self.urls = gateway_urls(gateways)
        self.timeout = timeout
        self._ops = Operations(token)
        self._local = threading.local()
        self._preferred = 0

    def __enter__(self) -> KVStoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close this thread's connections (other threads' close when their thread ends)."""
        connections: dict[str, http.client.HTTPConnection] = getattr(self._local, "connections", {})
        for connection in connections.values():
            connection.close()
        connections.clear()

    # -- operations ---------------------------------------------------------------------------------

    def put(
        self,
        key: str | bytes,
        value: bytes | str,
        ttl: int | None = None,
        flags: int = 0,
        cas: int | None = None,
        only_if_absent: bool = False,
    ) -> None:
        """Store ``value`` (str is stored as UTF-8). ``ttl``: seconds, or a Unix time past 30 days, as memcached.
        ``cas``: store only over that version (``Item.cas``); ``only_if_absent``: only when the key has no value.
        Either condition failing raises ``PreconditionFailed``."""
        self._call(self._ops.put(key, value, ttl, flags, cas, only_if_absent))

    def get(self, key: str | bytes) -> bytes | None:
        """The value of ``key``, or None when it has none."""
        item = self._call(self._ops.get(key))
        return item.value if item is not None else None

    def get_item(self, key: str | bytes) -> Item | None:
        """The value with its flags, version and expiry, or None."""
        return self._call(self._ops.get(key))

    def delete(self, key: str | bytes) -> bool:
        """Delete ``key``; False when it had no value."""
        return self._call(self._ops.delete(key))

    def lookup(self, key: str | bytes) -> dict[str, Any]:
        """The key's preference list: ``{"key", "hash", "epoch", "replicas", "nodes": [primary, ...]}``."""
        return self._call(self._ops.lookup(key))

    def ring(self, after: int | None = None, wait: float | None = None) -> dict[str, Any]:
        """The ring's JSON form (``GET /ring``). With ``after``, wait (up to ``wait`` seconds, default 30, at
        most 60) for an epoch newer than ``after``; the current ring comes back when the wait ends."""
        return self._call(self._ops.ring(after, wait))

    def hash_ring(self) -> HashRing:
        """The ring as a ``HashRing``, to place keys or compute ``shares()`` locally."""
        return hash_ring(self.ring())

    def placement(self, known: str | None = None, wait: float | None = None) -> dict[str, Any]:
        """The routing a gateway's data plane follows (``GET /ring/placement``, with the cluster's token). With
        ``known`` (a routing's tag), wait (up to ``wait`` seconds, default 30, at most 60) for another one."""
        return self._call(self._ops.placement(known, wait))

    def status(self) -> dict[str, Any]:
        """``GET /ring/status``: leader, epoch, quorums, nodes with keys and handoff progress, rebalancing."""
        return self._call(self._ops.status())

    def nodes(self) -> list[dict[str, Any]]:
        """Every node of the cluster map."""
        return self._call(self._ops.nodes())

    def node(self, node_id: str) -> dict[str, Any]:
        """One node of the map; ``NotFound`` when there is none with that id."""
        return self._call(self._ops.node(node_id))

    def drain(self, node_id: str) -> dict[str, Any]:
        """Mark the node ``leaving``: it gets no new writes and hands its data off."""
        return self._call(self._ops.drain(node_id))

    def remove(self, node_id: str) -> dict[str, Any]:
        """Remove the node from the map at once (its replicas are rebuilt elsewhere)."""
        return self._call(self._ops.remove(node_id))

    def health(self) -> dict[str, Any]:
        """``GET /health`` of the first gateway that answers."""
        return self._call(self._ops.health())

    def register(self, announcement: Mapping[str, Any]) -> dict[str, Any]:
        """Announce a kvstore node (``POST /ring/nodes``: ``id``, ``host``, ``port``, ``line_port``, ``weight``,
        ``seq``), as a kvstore does itself; needs the cluster's token."""
        return self._call(self._ops.register(announcement))

    # -- transport ----------------------------------------------------------------------------------

    def _call(self, call: Call[T]) -> T:
        errors: dict[str, str] = {}
        unavailable: Response | None = None
        count = len(self.urls)
        start = self._preferred
        for i in range(count):
            index = (start + i) % count
            base = self.urls[index]
            try:
                response = self._send(base, call)
            except _ConnectionFailed as e:
                errors[base] = str(e)
                continue
            if response.status == 503:
                unavailable = response
                errors[base] = f"503 {error_for(response).detail}"
                continue
            self._preferred = index
            return call.parse(response)
        if unavailable is not None:
            raise error_for(unavailable)
        raise Unreachable(errors)

    def _connection(self, base: str, fresh: bool) -> tuple[http.client.HTTPConnection, bool]:
        connections: dict[str, http.client.HTTPConnection] | None = getattr(self._local, "connections", None)
        if connections is None:
            connections = self._local.connections = {}
        connection = connections.get(base)
        if connection is not None and not fresh:
            return connection, True
        if connection is not None:
            connection.close()
        parts = urlsplit(base)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = kind(parts.hostname or "", parts.port, timeout=self.timeout)
        connections[base] = connection
        return connection, False

    def _send(self, base: str, call: Call[Any]) -> Response:
        url = base + call.path
        target = urlsplit(base).path + call.path
        fresh = False
        while True:
            connection, reused = self._connection(base, fresh)
            try:
                if call.extra_time:
                    connection.timeout = self.timeout + call.extra_time
                    if connection.sock is not None:
                        connection.sock.settimeout(connection.timeout)
                try:
                    connection.request(call.method, target, body=call.body, headers=dict(call.headers))
                except (BrokenPipeError, ConnectionResetError):
                    if not call.body:
                        raise
                    # A server may answer before it has read the whole body (413 for a value over its
                    # limit) and close; its answer is still readable here. If it is not, getresponse
                    # raises and the request failed as before.
                answer = connection.getresponse()
                body = answer.read()
                headers = {name.lower(): value for name, value in answer.getheaders()}
                if call.extra_time:
                    connection.timeout = self.timeout
                    if connection.sock is not None:
                        connection.sock.settimeout(self.timeout)
                if answer.will_close:
                    connection.close()
                return Response(url, answer.status, headers, body)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                connection.close()
                if reused and not fresh:
                    fresh = True  # the server closed an idle connection: once more on a new one
                    continue
                raise _ConnectionFailed(_reason(e)) from None
            except (OSError, http.client.HTTPException) as e:
                connection.close()
                raise _ConnectionFailed(_reason(e)) from None


def _reason(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, (ConnectionResetError, http.client.RemoteDisconnected)):
        return "connection closed by the server"
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return str(text)
