# -*- test-case-name: tests.unit.test_client,tests.unit.test_security -*-
"""The Klein resource shared by the kvstore and the gateway: the same HTTP surface over either backend.

Routes::

    GET    /kv/{key}     the value's raw bytes; ETag "<cas>", X-Chash-Flags; 404 when missing
    HEAD   /kv/{key}     the same headers, no body
    PUT    /kv/{key}     store the body; X-Chash-TTL (seconds, memcached exptime rules), X-Chash-Flags (u32);
                         If-Match: "<cas>" stores only over that version (cas), If-None-Match: * only if absent (add)
    DELETE /kv/{key}     204, or 404 when missing
    GET    /health       liveness: 200 while the process serves; 503 while its role does not serve yet
                         (a gateway not yet in the cluster map it serves), with the reason
    GET    /ready        readiness: 200 when the role can serve requests, else 503
    GET    /stats        JSON counters (keys, bytes, operations ...)
    GET    /metrics      Prometheus text format: the backend's stats, and what the role's registry holds
                         (chashd/web/_metrics.py: request latency per surface and command family, errors ...)
    GET    /openapi.json the OpenAPI 3.1 document of this role's HTTP API (chashd/openapi.json; a kvstore's
                         leaves out the paths marked ``x-chashd-roles: [gateway]``)

Keys are the URL path after /kv/, percent-decoded once (twisted.web decodes each segment; ``/`` and ``%2F``
are the same byte), taken as it is: ``//``, a leading or trailing ``/``, ``.`` and ``..`` segments stay in the
key (nothing merges slashes or removes dot segments), so every key the line protocol takes round-trips if it
is UTF-8: 1-250 bytes without spaces or control characters (memcached's rule). A path that is not UTF-8 once
decoded is a 400 naming the rule (``undecodable_path``), as is every bad key. Every error is
``application/problem+json`` with a ``detail``.

With a ``write_token`` (a kvstore given the cluster token), PUT and DELETE need ``Authorization: Bearer
<token>``: 401 without it, 403 with another, counted in ``http_writes_refused_total``. Reads stay open.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from functools import cache
from importlib.resources import files
from time import perf_counter
from typing import Any

from klein import Klein
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter

from chashd.commands import Delete, Get, Status, Store, StoreMode, Values
from chashd.errors import (
    NodeLeaving,
    NonNumericValue,
    NotServing,
    RequestError,
    ServiceUnavailable,
    StorageError,
    StorageFull,
    ValueTooLarge,
)
from chashd.interfaces import IKeyValue
from chashd.metrics import LatencyHistogram, RequestMetrics
from chashd.record import MAX_FLAGS, MAX_KEY_LENGTH, check_key
from chashd.web._limits import LimitedChannel, LimitedSite, problem_bytes

__all__ = [
    "Forbidden",
    "KeyPathConverter",
    "KeyValueHTTP",
    "Unauthorized",
    "check_bearer",
    "json_response",
    "openapi_document",
    "problem",
    "undecodable_path",
]

TTL_HEADER = "X-Chash-TTL"
FLAGS_HEADER = "X-Chash-Flags"
DEFAULT_MAX_BODY = 1024 * 1024


def json_response(request: IRequest, body: Any, code: int = 200) -> bytes:
    """Serialize ``body`` as the JSON answer of ``request``."""
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body, sort_keys=True).encode() + b"\n"


@cache
def openapi_document(role: str) -> dict[str, Any]:
    """The OpenAPI document as ``role`` serves it: the paths marked for other roles only are left out."""
    from chashd import __version__

    document: dict[str, Any] = json.loads(files("chashd").joinpath("openapi.json").read_text(encoding="utf-8"))
    document["info"]["version"] = __version__
    document["paths"] = {
        path: item for path, item in document["paths"].items() if role in item.get("x-chashd-roles", [role])
    }
    return document


def _problem_body(code: int, title: str, detail: str, **extra: Any) -> bytes:
    body = {"type": "about:blank", "title": title, "status": code, "detail": detail, **extra}
    return json.dumps(body, sort_keys=True).encode() + b"\n"


def problem(request: IRequest, code: int, title: str, detail: str, **extra: Any) -> bytes:
    """An RFC 9457 ``application/problem+json`` answer."""
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/problem+json")
    return _problem_body(code, title, detail, **extra)


class KeyPathConverter(PathConverter):
    """``<key:...>`` in a route: the rest of the path as it is, every ``/`` kept, a leading one and an empty
    key included (the key's rule is ``check_key``'s, which names it). werkzeug's ``path`` converter wants a
    first character other than ``/``: ``/kv/%2Fa`` (the key ``/a``) matched no route and was answered with a
    redirect to ``/kv/a``, another key. Register it as ``key`` on a Klein app's ``url_map.converters``."""

    regex = ".*"
    #: werkzeug takes a converter whose regex has no ``/`` for one that matches within a segment.
    part_isolating = False


def undecodable_path(request: IRequest) -> bytes | None:
    """The 400 problem+json answer to a request whose path is not UTF-8 once percent-decoded, naming the rule;
    None for every other request. (Klein answers such a path with a plain-text 400 and logs a traceback.)"""
    postpath = request.postpath
    for segment in postpath:
        if not segment.isascii():
            try:
                segment.decode("utf-8")
            except UnicodeDecodeError:
                break
    else:
        return None
    if len(postpath) > 1 and postpath[0] == b"kv":
        key = b"/".join(postpath[1:])
        shown = repr(key[:64]) + ("..." if len(key) > 64 else "")
        detail = (
            f"the key {shown} is not UTF-8 once percent-decoded: on the HTTP API a key is 1 to {MAX_KEY_LENGTH} "
            "bytes of UTF-8 without spaces or control characters (the line protocol also takes other bytes)"
        )
    else:
        detail = "the URL path is not UTF-8 once percent-decoded"
    return problem(request, 400, "Bad Request", detail)


class Unauthorized(RequestError):
    """No usable ``Authorization: Bearer`` header (HTTP 401)."""


class Forbidden(RequestError):
    """A bearer token, but not the cluster's (HTTP 403)."""


def check_bearer(request: IRequest, token: bytes | None) -> None:
    """Refuse ``request`` unless it carries ``Authorization: Bearer <token>`` (compared in constant time);
    anything goes when ``token`` is None. Raises ``Unauthorized`` or ``Forbidden``."""
    if token is None:
        return
    header = request.getHeader(b"Authorization")
    scheme, _, value = (header or b"").strip().partition(b" ")
    if scheme.lower() != b"bearer" or not value.strip():
        raise Unauthorized("this request needs the header Authorization: Bearer <token>")
    if not hmac.compare_digest(value.strip(), token):
        raise Forbidden("the token is not this cluster's")


#: Domain errors to (HTTP status, title): the one table of this adapter.
_ERRORS: list[tuple[type[Exception], int, str]] = [
    (Unauthorized, 401, "Unauthorized"),
    (Forbidden, 403, "Forbidden"),
    (ValueTooLarge, 413, "Payload Too Large"),
    (NonNumericValue, 409, "Conflict"),
    (RequestError, 400, "Bad Request"),
    (NodeLeaving, 503, "Service Unavailable"),
    (StorageFull, 507, "Insufficient Storage"),
    (ServiceUnavailable, 503, "Service Unavailable"),
    (StorageError, 503, "Service Unavailable"),  # its message names the problem, never a path (the logs do)
]


class _BadHeader(RequestError):
    """A request header with a value we cannot use."""


class _BoundedRequest(Request):
    """A request that refuses a body over the site's ``max_body`` before reading it all."""

    def gotLength(self, length: int | None) -> None:
        limit = getattr(self.channel.site, "max_body", DEFAULT_MAX_BODY)  # type: ignore[attr-defined]  # channel: Twisted types it as an interface without .site
        self._body_limit = limit
        self._body_seen = 0
        if length is not None and length > limit:
            self._refuse(length, limit)
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.channel is None:
            return
        self._body_seen += len(data)
        if self._body_seen > self._body_limit:
            self._refuse(self._body_seen, self._body_limit)
            return
        super().handleContentChunk(data)

    def _refuse(self, size: int, limit: int) -> None:
        """Answer 413 before the body is read, then close lingering (``LimitedChannel.discard``): the client
        may still be sending, and a reset would destroy the answer."""
        body = _problem_body(413, "Payload Too Large", f"the body of {size} bytes is over the limit of {limit} bytes")
        channel: Any = self.channel
        transport = channel.transport
        assert transport is not None
        transport.write(problem_bytes(413, b"Payload Too Large", body))
        if isinstance(channel, LimitedChannel):
            channel.discard()
        else:
            transport.loseConnection()
        self.channel = None  # type: ignore[assignment]  # as Request.finish does: the request is over


class _QuietSite(LimitedSite):
    """A site with no access log (a line per request costs more than the request), a body cap and the
    connection limits of ``LimitedSite``."""

    noisy = False
    requestFactory = _BoundedRequest

    def __init__(self, resource: IResource, max_body: int, **limits: Any) -> None:
        super().__init__(resource, **limits)
        self.max_body = max_body

    def log(self, request: Any) -> None:
        pass


#: ``stats()`` names that are counters though their names do not say so (memcached's and the router's names).
_COUNTER_NAMES = frozenset(
    {"evictions", "reclaimed", "total_items", "get_expired", "quorum_failures", "read_repairs", "cas_badval"}
)


class _StatsCollector(Collector):
    """Exports a backend's ``stats()`` to Prometheus at scrape time (no cost per request)."""

    def __init__(self, stats: Callable[[], dict[str, Any]], role: str) -> None:
        self._stats = stats
        self._role = role

    def collect(self) -> Any:
        stats = self._stats()
        for name, value in sorted(stats.items()):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric = "chashd_" + name.replace(".", "_").replace("-", "_")
            if (
                name in _COUNTER_NAMES
                or name.endswith("_total")
                or name.startswith("cmd_")
                or name.endswith("_hits")
                or name.endswith("_misses")
            ):
                yield CounterMetricFamily(metric, f"{self._role} counter {name}", value=value)
            else:
                yield GaugeMetricFamily(metric, f"{self._role} gauge {name}", value=value)


def _header_int(request: IRequest, name: str, low: int, high: int) -> int | None:
    raw = request.getHeader(name)
    if raw is None:
        return None
    text = raw.strip()
    if not text.lstrip("-").isdigit() or not low <= int(text) <= high:
        raise _BadHeader(f"header {name}: {text!r} is not an integer from {low} to {high}")
    return int(text)


def _etag(cas: int) -> bytes:
    return b'"%d"' % cas


class KeyValueHTTP:
    """The key-value HTTP surface over a role's backend (``IKeyValue``).

    ``health`` returns the JSON body of ``GET /health``; ``ready`` returns ``(ready, reason)`` for
    ``GET /ready``; ``metrics`` is a Prometheus registry holding the role's own collectors (the backend's
    stats are added to it here). ``write_token``: PUT and DELETE need it (see the module docstring);
    ``auth_stats()`` counts the refusals. ``requests``, when given, times each /kv request (surface
    ``http``) and counts the error answers.
    """

    app = Klein()
    app.url_map.converters["key"] = KeyPathConverter
    _log = Logger()

    def __init__(
        self,
        backend: IKeyValue | None = None,
        health: Callable[[], dict[str, Any]] = dict,
        ready: Callable[[], tuple[bool, str]] | None = None,
        max_value_size: int = DEFAULT_MAX_BODY,
        metrics: CollectorRegistry | None = None,
        role: str = "chashd",
        write_token: str | None = None,
        requests: RequestMetrics | None = None,
    ) -> None:
        self._backend = backend
        self._write_token = write_token.encode() if write_token else None
        self._refused = 0
        self._health = health
        self._ready = ready or (lambda: (True, "serving"))
        self._max_value_size = max_value_size
        self._role = role
        self._requests = requests
        self.metrics = metrics or CollectorRegistry(auto_describe=True)
        if backend is not None:
            self.metrics.register(_StatsCollector(backend.stats, role))

    def resource(self) -> IResource:
        """The twisted.web resource to serve: the Klein app, behind ``_KeyReads`` (``GET``/``HEAD`` of one
        key answered without Klein's routing)."""
        return _KeyReads(self, self.app.resource())

    def auth_stats(self) -> dict[str, int]:
        """Writes refused for want of the token."""
        return {"http_writes_refused_total": self._refused}

    def _authorize_write(self, request: IRequest) -> None:
        try:
            check_bearer(request, self._write_token)
        except RequestError:
            self._refused += 1
            raise

    def site(
        self,
        resource: IResource | None = None,
        max_connections: int = 1024,
        idle_timeout: float = 600.0,
        client_timeout: float = 30.0,
        reactor: Any = None,
    ) -> LimitedSite:
        """A ``Site`` serving ``resource`` (default: this surface) with the body capped at the value limit and
        the connection limits of ``chashd.web._limits.LimitedSite``."""
        # Headers and the request line are bounded by twisted.web itself; the body by _BoundedRequest.
        return _QuietSite(
            resource or self.resource(),
            max_body=self._max_value_size,
            max_connections=max_connections,
            idle_timeout=idle_timeout,
            client_timeout=client_timeout,
            reactor=reactor,
        )

    # -- key-value ------------------------------------------------------------------------------

    def _key(self, key: str) -> bytes:
        return check_key(key.encode("utf-8"))

    def _execute(self, command: Any, family: str) -> Deferred[Any]:
        if self._backend is None:
            raise ServiceUnavailable("this server has no key-value backend")
        try:
            result = self._backend.execute(command)
        except Exception:
            return fail()
        d = result if isinstance(result, Deferred) else succeed(result)
        if self._requests is not None:
            d.addBoth(_observe, self._requests.histogram("http", family), perf_counter())
        return d

    @app.route("/kv/<key:key>", methods=["GET", "HEAD"])
    def get(self, request: IRequest, key: str) -> Any:
        """Read a value."""
        k = self._key(key)
        return self._execute(Get((k,), cas=True), "get").addCallback(self._got, request, k)

    def _got(self, result: Values, request: IRequest, key: bytes) -> bytes:
        for item_key, record in result.items:
            if item_key == key:
                headers = request.responseHeaders
                set_header = headers.setRawHeaders
                set_header(b"Content-Type", _OCTET_STREAM)
                set_header(b"ETag", [_etag(record.version.cas)])
                set_header(b"X-Chash-Flags", [b"%d" % record.flags])
                if record.expires_at:
                    set_header(b"X-Chash-Expires-At", [b"%d" % record.expires_at])
                value = record.value
                set_header(b"Content-Length", [b"%d" % len(value)])
                return value
        return problem(request, 404, "Not Found", f"no value for key {key.decode('utf-8', 'replace')!r}")

    def _read(self, request: Request, key: bytes) -> Any:
        """``GET``/``HEAD /kv/<key>`` for ``_KeyReads``: the answer of ``get`` and its error handlers, without
        Klein (its routing, its Deferreds and its error-handler chain); ``key`` is checked already."""
        requests = self._requests
        start = perf_counter() if requests is not None else 0.0
        lost = _lost_notice(request)
        try:
            result = self._backend.execute(Get((key,), cas=True))  # type: ignore[union-attr]  # _KeyReads checked it
        except Exception:
            self._read_failed(Failure(), request, start, lost)
            return NOT_DONE_YET
        if isinstance(result, Deferred):
            result.addCallbacks(
                self._read_done,
                self._read_failed,
                callbackArgs=(request, key, start, lost),
                errbackArgs=(request, start, lost),
            )
        else:
            self._read_done(result, request, key, start, lost)
        return NOT_DONE_YET

    def _read_done(
        self, result: Values, request: Request, key: bytes, start: float, lost: Deferred[None] | None
    ) -> None:
        if self._requests is not None:
            self._requests.histogram("http", "get").observe(perf_counter() - start)
        try:
            body = self._got(result, request, key)
        except Exception:
            body = self._count_error(request, error_problem(request, Failure(), _ERRORS, self._log))
        _send(request, body, lost)

    def _read_failed(self, failure: Failure, request: Request, start: float, lost: Deferred[None] | None) -> None:
        if self._requests is not None:
            self._requests.histogram("http", "get").observe(perf_counter() - start)
        _send(request, self._count_error(request, error_problem(request, failure, _ERRORS, self._log)), lost)

    @app.route("/kv/<key:key>", methods=["PUT"])
    def put(self, request: IRequest, key: str) -> Any:
        """Store a value (set, or cas / add with If-Match / If-None-Match)."""
        self._authorize_write(request)
        k = self._key(key)
        ttl = _header_int(request, TTL_HEADER, -1, 2**31 - 1) or 0
        flags = _header_int(request, FLAGS_HEADER, 0, MAX_FLAGS) or 0
        value = request.content.read() if request.content is not None else b""
        if len(value) > self._max_value_size:
            raise ValueTooLarge(len(value), self._max_value_size)
        mode: StoreMode = "set"
        cas_unique = None
        if_match = request.getHeader("If-Match")
        if if_match is not None:
            tag = if_match.strip().removeprefix("W/").strip('"')
            if not tag.isdigit():
                raise _BadHeader(f"header If-Match: {if_match!r} is not an ETag this server gave")
            mode, cas_unique = "cas", int(tag)
        elif (request.getHeader("If-None-Match") or "").strip() == "*":
            mode = "add"
        command = Store(mode, k, flags, ttl, value, cas_unique)
        return self._execute(command, "store").addCallback(self._stored, request, k, mode)

    def _stored(self, result: Status, request: IRequest, key: bytes, mode: str) -> bytes:
        if result is Status.STORED:
            request.setResponseCode(204)
            return b""
        shown = key.decode("utf-8", "replace")
        if result is Status.EXISTS:
            return problem(request, 412, "Precondition Failed", f"key {shown!r} changed since that ETag")
        if result is Status.NOT_FOUND:
            return problem(request, 412, "Precondition Failed", f"key {shown!r} has no value to compare with")
        if result is Status.NOT_STORED and mode == "add":
            return problem(request, 412, "Precondition Failed", f"key {shown!r} already has a value")
        return problem(request, 409, "Conflict", f"key {shown!r} was not stored ({result.value})")

    @app.route("/kv/<key:key>", methods=["DELETE"])
    def delete(self, request: IRequest, key: str) -> Any:
        """Delete a value."""
        self._authorize_write(request)
        k = self._key(key)
        return self._execute(Delete(k), "delete").addCallback(self._deleted, request, k)

    def _deleted(self, result: Status, request: IRequest, key: bytes) -> bytes:
        if result is Status.DELETED:
            request.setResponseCode(204)
            return b""
        return problem(request, 404, "Not Found", f"no value for key {key.decode('utf-8', 'replace')!r}")

    # -- operations -----------------------------------------------------------------------------

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request: IRequest) -> bytes:
        """Liveness: the process is up and its reactor answers, and its role serves (``health`` raises
        ``NotServing`` while it does not yet: a 503 saying why, with the fields it has and ``Retry-After``)."""
        try:
            report = self._health()
        except NotServing as e:
            request.setHeader(b"Retry-After", b"1")
            return problem(request, 503, "Service Unavailable", str(e), **e.report, serving=False)
        return json_response(request, {"status": "ok", **report})

    @app.route("/ready", methods=["GET", "HEAD"])
    def ready(self, request: IRequest) -> bytes:
        """Readiness: the role can serve key-value requests."""
        ok, reason = self._ready()
        if ok:
            return json_response(request, {"ready": True, "reason": reason})
        return problem(request, 503, "Service Unavailable", reason, ready=False)

    @app.route("/stats", methods=["GET"])
    def stats(self, request: IRequest) -> bytes:
        """Counters and gauges as JSON."""
        return json_response(request, self._backend.stats() if self._backend is not None else {})

    @app.route("/metrics", methods=["GET"])
    def metrics_text(self, request: IRequest) -> bytes:
        """Prometheus text exposition."""
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return generate_latest(self.metrics)

    @app.route("/openapi.json", methods=["GET", "HEAD"])
    def openapi(self, request: IRequest) -> bytes:
        """The OpenAPI document of this role's HTTP API."""
        return json_response(request, openapi_document(self._role))

    # -- errors ---------------------------------------------------------------------------------

    @app.handle_errors(HTTPException)
    def _routing_error(self, request: IRequest, failure: Failure) -> bytes:
        return self._count_error(request, routing_problem(request, failure))

    @app.handle_errors(Exception)
    def _error(self, request: IRequest, failure: Failure) -> bytes:
        return self._count_error(request, error_problem(request, failure, _ERRORS, self._log))

    def _count_error(self, request: IRequest, body: bytes) -> bytes:
        if self._requests is not None:
            self._requests.error("http", "server" if request.code >= 500 else "client")  # type: ignore[attr-defined]  # IRequest has no .code; a Request has
        return body


#: The Content-Type of a value.
_OCTET_STREAM = (b"application/octet-stream",)


def _lost_notice(request: Request) -> Deferred[None] | None:
    """How ``_send`` learns that the client of a read answered later went away: None where the request flags it
    itself (twisted.web's ``Request`` sets ``_disconnected`` in ``connectionLost``: a private attribute, read
    directly because ``notifyFinish`` would cost a Deferred a request); for a request without that flag (a
    twisted.web that renamed it, another ``IRequest``), the public way: ``notifyFinish()``, whose Deferred fails
    when the connection is lost before the request finishes (the failure is expected, and consumed here)."""
    if type(getattr(request, "_disconnected", None)) is bool:
        return None
    notice: Deferred[None] = request.notifyFinish()
    notice.addErrback(_client_gone)
    return notice


def _client_gone(failure: Failure) -> None:
    """The client of a read went away before its answer (``_lost_notice``): nothing to report."""


def _send(request: Request, body: bytes, lost: Deferred[None] | None) -> None:
    """Write ``body`` and finish ``request``, as Klein does with a route's answer; nothing when the client is
    gone: twisted.web's ``_disconnected`` says so, or, where the request has no such flag, ``lost`` (its
    ``_lost_notice``), fired before the request finishes only by a lost connection."""
    if lost is None:
        if request._disconnected:  # Twisted sets it in connectionLost (_lost_notice checked it exists)
            return
    elif lost.called:
        return
    request.write(body)
    request.finish()


_READS = frozenset({b"GET", b"HEAD"})


class _KeyReads(Resource):
    """``GET`` and ``HEAD /kv/<key>`` of one valid key, answered by ``KeyValueHTTP._read`` without Klein's
    routing (werkzeug's URL matching and Klein's Deferreds cost more than the rest of such a request); every
    other request, a key that fails ``check_key`` included, goes to the Klein resource, which answers it as
    before (the answers are the same: ``tests/unit/test_http_fast.py`` compares them), except a path that is
    not UTF-8 once percent-decoded, which gets ``undecodable_path``'s 400 here.

    A leaf, like the Klein resource it stands in front of: it sees the whole path.
    """

    isLeaf = True

    def __init__(self, http: KeyValueHTTP, app: IResource) -> None:
        super().__init__()
        self._http = http
        self._app = app

    def render(self, request: IRequest) -> Any:
        postpath = request.postpath
        if (
            len(postpath) == 2  # /kv/<one segment> (which may hold a %2F); more segments go to Klein
            and postpath[0] == b"kv"
            and request.method in _READS
            and self._http._backend is not None
        ):
            key = postpath[1]
            if key and _plain_key(key):
                return self._http._read(request, key)  # type: ignore[arg-type]  # a twisted.web Request
        refusal = undecodable_path(request)
        if refusal is not None:
            return self._http._count_error(request, refusal)
        return self._app.render(request)


def _plain_key(key: bytes) -> bool:
    """``key`` (percent-decoded) is UTF-8 and a valid key."""
    if not key.isascii():
        try:
            key.decode("utf-8")
        except UnicodeDecodeError:
            return False
    try:
        check_key(key)
    except RequestError:
        return False
    return True


def _observe(result: Any, histogram: LatencyHistogram, start: float) -> Any:
    histogram.observe(perf_counter() - start)
    return result


def routing_problem(request: IRequest, failure: Failure) -> bytes:
    """The problem+json answer to a routing error (no such route: 404, wrong method: 405 with ``Allow``)."""
    error = failure.value
    assert isinstance(error, HTTPException)
    code = error.code or 500
    if code == 405:
        allowed = ", ".join(sorted(getattr(error, "valid_methods", None) or []))
        request.setHeader(b"Allow", allowed.encode())
        detail = f"{request.method.decode()} is not allowed here; use {allowed}"
    elif code == 404:
        detail = f"no such resource: {request.path.decode(errors='replace')}"
    else:
        detail = error.description or error.name
    return problem(request, code, error.name, detail)


def error_problem(
    request: IRequest, failure: Failure, table: list[tuple[type[Exception], int, str]], log: Logger
) -> bytes:
    """The problem+json answer to a failure: the first ``(error, status, title)`` of ``table`` it matches,
    else a logged 500. A 503 says when to retry; a 401 names the scheme."""
    for kind, code, title in table:
        if failure.check(kind):
            if code == 503:
                request.setHeader(b"Retry-After", b"1")
            elif code == 401:
                request.setHeader(b"WWW-Authenticate", b'Bearer realm="chashd"')
            return problem(request, code, title, str(failure.value))
    log.failure("unexpected error answering {method} {path}", failure, method=request.method, path=request.path)
    return problem(request, 500, "Internal Server Error", "the server failed to handle the request")
