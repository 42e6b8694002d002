"""Python clients of a chashd cluster's HTTP API: one blocking, one for Twisted code.

    from chashd.client import KVStoreClient, NotFound

    client = KVStoreClient(["http://10.0.0.5:8000", "http://10.0.0.6:8000"], timeout=5)
    client.put("user:42", b"{...}", ttl=3600, flags=1)
    client.get("user:42")            # b"{...}", or None when the key has no value
    client.lookup("user:42")         # the preference list: {"nodes": [{"id": "kvstore-A", ...}, ...], ...}

``KVStoreClient`` uses only the standard library (``http.client``): a persistent connection per gateway and
per thread, so one client may be shared by threads. ``AsyncKVStoreClient`` does the same on treq and
returns Deferreds. Both take one or several gateway URLs (``host:port`` is read as ``http://host:port``) and
try them in turn when one cannot be reached or answers 503 (no quorum, no leader, shutting down: the
gateway says the request is safe to repeat); the gateway that last answered is tried first next time.
A kvstore's URL works as well for the key-value operations (it serves the same ``/kv`` API).

Every failure raises (or fails the Deferred with) a ``ChashError``, carrying the server's problem+json
``detail`` when there is one:

    ChashError
      Rejected             the server refused the request (HTTP 4xx), or the client did before sending it
        NotFound           404: no such node, no such route (a missing key is ``None``/``False`` instead)
        PreconditionFailed 412: ``cas=`` that is not the stored version, ``only_if_absent`` over a value
        Unauthorized       401/403: node admin, or a write to a kvstore directly, wants the cluster's token
                           (``token=``: sent as ``Authorization: Bearer <token>``)
      ServerError          5xx after every gateway was tried, or an answer that is not what the API says
      Unreachable          no gateway could be reached (connection refused, reset, timed out)
"""

from __future__ import annotations

import http.client
import json
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote, urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from chashd.errors import BadKey
from chashd.record import MAX_FLAGS, check_key
from chashd.ring import HashRing

__all__ = [
    "DEFAULT_GATEWAY",
    "AsyncKVStoreClient",
    "ChashError",
    "Item",
    "KVStoreClient",
    "NotFound",
    "PreconditionFailed",
    "Rejected",
    "ServerError",
    "Unauthorized",
    "Unreachable",
    "gateway_urls",
]

T = TypeVar("T")

DEFAULT_GATEWAY = "http://127.0.0.1:8000"
#: The environment variable read when no gateway URL is given: comma-separated URLs.
GATEWAY_VARIABLE = "CHASH_GATEWAY"
TTL_HEADER = "X-Chash-TTL"
FLAGS_HEADER = "X-Chash-Flags"


# -- errors ------------------------------------------------------------------------------------------


class ChashError(Exception):
    """Any failure of a client operation. ``str(error)`` is one line for a person.

    ``status`` is the HTTP status (None when no server answered, or the client refused to send),
    ``detail`` the server's problem+json detail (or the client's own words), ``url`` the URL asked.
    """

    def __init__(self, detail: str, status: int | None = None, url: str | None = None, title: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.url = url
        self.title = title


class Rejected(ChashError):
    """The request was refused as it is (HTTP 4xx): repeating it unchanged will not help."""


class NotFound(Rejected):
    """HTTP 404: no such node or resource."""


class PreconditionFailed(Rejected):
    """HTTP 412: a conditional write (``cas=``, ``only_if_absent=True``) whose condition did not hold."""


class Unauthorized(Rejected):
    """HTTP 401 or 403: the operation needs the cluster's token (``token=``), or another one."""


class ServerError(ChashError):
    """The server failed (HTTP 5xx on every gateway tried) or answered something the API does not define."""


class Unreachable(ChashError):
    """No gateway could be reached; ``errors`` maps each URL tried to what went wrong."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        self.errors = dict(errors)
        tried = "; ".join(f"{url}: {why}" for url, why in self.errors.items())
        super().__init__(f"no gateway could be reached ({tried})")


_BY_STATUS: dict[int, type[Rejected]] = {
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    412: PreconditionFailed,
}


# -- values ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """A stored value with its metadata: ``cas`` is the version (the ETag), usable with ``put(cas=...)``;
    ``expires_at`` is a Unix time, 0 for never."""

    key: str
    value: bytes
    flags: int = 0
    cas: int = 0
    expires_at: int = 0


def gateway_urls(gateways: str | Iterable[str] | None = None, environ: Mapping[str, str] | None = None) -> list[str]:
    """Normalised base URLs: from ``gateways`` (a URL, a comma-separated list or an iterable of them), else
    from ``$CHASH_GATEWAY`` (comma-separated), else ``http://127.0.0.1:8000``.

    ``host:port`` becomes ``http://host:port``; a trailing ``/`` is dropped. Raises ``ValueError`` on an
    item that is not an http(s) URL.
    """
    if gateways is None:
        environ = os.environ if environ is None else environ
        gateways = environ.get(GATEWAY_VARIABLE) or DEFAULT_GATEWAY
    items = [gateways] if isinstance(gateways, str) else list(gateways)
    urls: list[str] = []
    for item in items:
        for part in item.split(","):
            text = part.strip()
            if not text:
                continue
            if "://" not in text:
                text = "http://" + text
            parts = urlsplit(text)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{part.strip()!r} is not a gateway URL such as http://127.0.0.1:8000")
            try:
                parts.port  # noqa: B018 - raises ValueError on a port out of range
            except ValueError:
                raise ValueError(f"{part.strip()!r} has a bad port number") from None
            url = text.rstrip("/")
            if url not in urls:
                urls.append(url)
    if not urls:
        raise ValueError("no gateway URL given")
    return urls


def _key_path(key: str | bytes) -> str:
    """``/kv/<key>`` with the key checked (memcached's rule) and percent-encoded."""
    raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    try:
        check_key(raw)
        text = raw.decode("utf-8")
    except BadKey as e:
        raise Rejected(f"bad key {key!r}: {e}") from None
    except UnicodeDecodeError:
        raise Rejected(f"bad key {key!r}: the HTTP API takes UTF-8 keys") from None
    return "/kv/" + quote(text, safe="")


# -- requests and how their answers are read (shared by both clients) --------------------------------


@dataclass(frozen=True)
class _Response:
    """An HTTP answer: header names in lower case."""

    url: str
    status: int
    headers: Mapping[str, str]
    body: bytes


def _error(response: _Response) -> ChashError:
    """The ``ChashError`` for an answer that is not a success, with the problem+json detail if any."""
    detail, title = "", ""
    try:
        problem = json.loads(response.body) if response.body else None
    except ValueError:
        problem = None
    if isinstance(problem, dict):
        detail = str(problem.get("detail") or "")
        title = str(problem.get("title") or "")
    if not detail:
        text = response.body[:200].decode("utf-8", "replace").strip()
        detail = f"HTTP {response.status}" + (f": {text}" if text else "")
    kind: type[ChashError] = ServerError
    if 400 <= response.status < 500:
        kind = _BY_STATUS.get(response.status, Rejected)
    return kind(detail, status=response.status, url=response.url, title=title)


def _json(response: _Response) -> Any:
    if response.status >= 300:
        raise _error(response)
    try:
        return json.loads(response.body)
    except ValueError:
        raise ServerError(
            f"the answer of {response.url} is not JSON", status=response.status, url=response.url
        ) from None


def _json_object(response: _Response) -> dict[str, Any]:
    body = _json(response)
    if not isinstance(body, dict):
        raise ServerError(f"the answer of {response.url} is not a JSON object", status=response.status)
    return body


def _nothing(response: _Response) -> None:
    if response.status >= 300:
        raise _error(response)


def _header_int(response: _Response, name: str) -> int:
    text = response.headers.get(name.lower(), "0").strip().removeprefix("W/").strip('"')
    return int(text) if text.isdigit() else 0


def _item(key: str) -> Callable[[_Response], Item | None]:
    def parse(response: _Response) -> Item | None:
        if response.status == 404:
            return None
        if response.status != 200:
            raise _error(response)
        return Item(
            key=key,
            value=response.body,
            flags=_header_int(response, FLAGS_HEADER),
            cas=_header_int(response, "ETag"),
            expires_at=_header_int(response, "X-Chash-Expires-At"),
        )

    return parse


def _deleted(response: _Response) -> bool:
    if response.status == 404:
        return False
    if response.status >= 300:
        raise _error(response)
    return True


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One operation: the request to send to a gateway and how to read the answer."""

    method: str
    path: str
    parse: Callable[[_Response], T]
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Seconds the server may take on purpose (a long poll), added to the client's timeout.
    extra_time: float = 0.0


class _Operations:
    """The calls of the API, built once for both clients."""

    def __init__(self, token: str | None) -> None:
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}

    def put(
        self,
        key: str | bytes,
        value: bytes | str,
        ttl: int | None,
        flags: int,
        cas: int | None,
        only_if_absent: bool,
    ) -> _Call[None]:
        data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        if not 0 <= flags <= MAX_FLAGS:
            raise Rejected(f"flags {flags} is not an unsigned 32-bit integer")
        headers = {"Content-Type": "application/octet-stream", **self._auth}  # a kvstore's writes need it
        if ttl:
            headers[TTL_HEADER] = str(int(ttl))
        if flags:
            headers[FLAGS_HEADER] = str(flags)
        if cas is not None:
            headers["If-Match"] = f'"{int(cas)}"'
        elif only_if_absent:
            headers["If-None-Match"] = "*"
        return _Call("PUT", _key_path(key), _nothing, data, headers)

    def get(self, key: str | bytes) -> _Call[Item | None]:
        shown = key if isinstance(key, str) else key.decode("utf-8", "replace")
        return _Call("GET", _key_path(key), _item(shown))

    def delete(self, key: str | bytes) -> _Call[bool]:
        return _Call("DELETE", _key_path(key), _deleted, None, self._auth)

    def lookup(self, key: str | bytes) -> _Call[dict[str, Any]]:
        return _Call("GET", "/ring/lookup/" + _key_path(key).removeprefix("/kv/"), _json_object)

    def ring(self, after: int | None, wait: float | None) -> _Call[dict[str, Any]]:
        if after is None:
            return _Call("GET", "/ring", _json_object)
        wait = 30.0 if wait is None else wait
        return _Call("GET", f"/ring?after={int(after)}&timeout={wait:g}", _json_object, extra_time=wait)

    def status(self) -> _Call[dict[str, Any]]:
        return _Call("GET", "/ring/status", _json_object)

    def nodes(self) -> _Call[list[dict[str, Any]]]:
        def parse(response: _Response) -> list[dict[str, Any]]:
            nodes = _json_object(response).get("nodes")
            if not isinstance(nodes, list):
                raise ServerError(f"the answer of {response.url} has no node list", status=response.status)
            return nodes

        return _Call("GET", "/ring/nodes", parse)

    def node(self, node_id: str) -> _Call[dict[str, Any]]:
        def parse(response: _Response) -> dict[str, Any]:
            node = _json_object(response).get("node")
            if not isinstance(node, dict):
                raise ServerError(f"the answer of {response.url} has no node", status=response.status)
            return node

        return _Call("GET", "/ring/nodes/" + quote(node_id, safe=""), parse)

    def drain(self, node_id: str) -> _Call[dict[str, Any]]:
        return _Call("POST", f"/ring/nodes/{quote(node_id, safe='')}/drain", _json_object, b"", self._auth)

    def remove(self, node_id: str) -> _Call[dict[str, Any]]:
        return _Call("DELETE", "/ring/nodes/" + quote(node_id, safe=""), _json_object, None, self._auth)

    def health(self) -> _Call[dict[str, Any]]:
        return _Call("GET", "/health", _json_object)


def _hash_ring(ring: dict[str, Any]) -> HashRing:
    try:
        return HashRing.from_dict(ring)
    except ValueError as e:
        raise ServerError(f"the gateway's ring cannot be rebuilt: {e}") from None


# -- the blocking client -------------------------------------------------------------------------------


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
        self._ops = _Operations(token)
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
        return _hash_ring(self.ring())

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

    # -- transport ----------------------------------------------------------------------------------

    def _call(self, call: _Call[T]) -> T:
        errors: dict[str, str] = {}
        unavailable: _Response | None = None
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
                errors[base] = f"503 {_error(response).detail}"
                continue
            self._preferred = index
            return call.parse(response)
        if unavailable is not None:
            raise _error(unavailable)
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

    def _send(self, base: str, call: _Call[Any]) -> _Response:
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
                connection.request(call.method, target, body=call.body, headers=dict(call.headers))
                answer = connection.getresponse()
                body = answer.read()
                headers = {name.lower(): value for name, value in answer.getheaders()}
                if call.extra_time:
                    connection.timeout = self.timeout
                    if connection.sock is not None:
                        connection.sock.settimeout(self.timeout)
                if answer.will_close:
                    connection.close()
                return _Response(url, answer.status, headers, body)
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


# -- the asynchronous client -----------------------------------------------------------------------------


class AsyncKVStoreClient:
    """The same operations for Twisted code, on treq: each returns a Deferred.

    ``reactor_or_treq``: a reactor (a persistent treq client is made on it) or a treq ``HTTPClient`` (or
    ``treq.testing.StubTreq``). ``reactor``: the clock for timeouts when a treq client is given (default:
    the global reactor, imported only then).
    """

    def __init__(
        self,
        reactor_or_treq: Any,
        gateways: str | Sequence[str] | None = None,
        timeout: float = 5.0,
        token: str | None = None,
        reactor: Any = None,
    ) -> None:
        self._pool: Any = None
        if hasattr(reactor_or_treq, "request"):
            self._treq = reactor_or_treq
            self._reactor = reactor
        else:
            from treq.client import HTTPClient
            from twisted.web.client import Agent, HTTPConnectionPool

            self._reactor = reactor_or_treq
            self._pool = HTTPConnectionPool(reactor_or_treq, persistent=True)
            self._treq = HTTPClient(Agent(reactor_or_treq, connectTimeout=timeout, pool=self._pool))
        self.urls = gateway_urls(gateways)
        self.timeout = timeout
        self._ops = _Operations(token)
        self._preferred = 0

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
        return self.ring().addCallback(_hash_ring)

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
        """``GET /health`` of the first gateway that answers."""
        return self._call_safely(self._ops.health)

    # -- transport ----------------------------------------------------------------------------------

    def _call_safely(self, build: Callable[[], _Call[T]]) -> Deferred[T]:
        """A bad argument fails the Deferred (it is not raised), as callers of Deferred APIs expect."""
        try:
            call = build()
        except ChashError:
            failed: Deferred[T] = Deferred()
            failed.errback(Failure())
            return failed
        return self._call(call)

    def _call(self, call: _Call[T]) -> Deferred[T]:
        result: Deferred[T] = Deferred()
        errors: dict[str, str] = {}
        count = len(self.urls)
        start = self._preferred
        unavailable: list[_Response] = []

        def attempt(i: int) -> None:
            if i == count:
                result.errback(_error(unavailable[-1]) if unavailable else Unreachable(errors))
                return
            index = (start + i) % count
            base = self.urls[index]
            d = self._send(base, call)

            def answered(response: _Response) -> None:
                if response.status == 503:
                    unavailable.append(response)
                    errors[base] = f"503 {_error(response).detail}"
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
                errors[base] = _async_reason(failure)
                attempt(i + 1)

            d.addCallbacks(answered, failed)

        attempt(0)
        return result

    def _send(self, base: str, call: _Call[Any]) -> Deferred[_Response]:
        import treq

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
        d: Deferred[Any] = self._treq.request(call.method, url, **kwargs)

        def read(response: Any) -> Deferred[_Response]:
            headers = {
                name.decode("latin-1").lower(): values[0].decode("latin-1")
                for name, values in response.headers.getAllRawHeaders()
            }
            body: Deferred[bytes] = treq.content(response)
            return body.addCallback(lambda data: _Response(url, response.code, headers, data))

        return d.addCallback(read)


def _async_reason(failure: Failure) -> str:
    from twisted.internet.defer import CancelledError
    from twisted.internet.error import ConnectionRefusedError as Refused
    from twisted.internet.error import TimeoutError as Timeout

    if failure.check(CancelledError, Timeout):
        return "timed out"
    if failure.check(Refused):
        return "connection refused"
    reasons = getattr(failure.value, "reasons", None)  # ResponseFailed and friends wrap their causes
    if reasons:
        return "; ".join(_async_reason(r) if isinstance(r, Failure) else str(r) for r in reasons)
    return str(failure.value) or failure.type.__name__  # type: ignore[union-attr]
