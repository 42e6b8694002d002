# -*- test-case-name: tests.unit.test_ring_api -*-
"""The gateway's ring routes (Klein): the cluster map for clients and kvstores, and node admin.

Routes::

    GET    /ring                      the ring's JSON form (HashRing.to_dict()) with each node's host, ports
                                      and state, the leaving nodes, the gateways and ``replicas`` (N, capped at
                                      the ring's size);
                                      ?after=<epoch>&timeout=<s> waits until the epoch exceeds <epoch> or the
                                      timeout passes (at most 60 s), then answers the current ring
    GET    /ring/placement            the routing the gateway's own router follows (chashd.gateway.follow), for
                                      its workers and the gateways that follow it; ?known=<tag>&timeout=<s>
                                      waits for another; needs the token when one is configured
    GET    /ring/status               gateway_id, leader (id, or null unless map_current), map_current (it
                                      leads, or heard from the leader within its election timeout),
                                      last_leader (the leader Raft names, current or not), epoch, replicas,
                                      write_quorum, read_quorum, nodes, gateways, rebalancing, and what
                                      status_extra() adds
    GET    /ring/lookup/{key}         the key's preference list: N nodes, primary first, with address and state
    GET    /ring/nodes                every node of the map
    GET    /ring/nodes/{id}           one node
    POST   /ring/nodes                register: {"id", "host", "port", "line_port", "weight", "seq"};
                                      201 registered, 200 updated or unchanged, 409 another live node has the
                                      id or the seq is stale
    POST   /ring/nodes/{id}/drain     start the node's drain (state leaving)
    DELETE /ring/nodes/{id}           remove the node from the map

With a token configured, register, drain and remove need ``Authorization: Bearer <token>`` (401 without
it, 403 with another). Every error is ``application/problem+json``; a change that could not be confirmed
(no Raft leader, leader change, timeout) is a 503 with ``Retry-After``, and is safe to retry. A gateway
that knows no leader, or has heard from none within its election timeout, refuses a change at once (a 503
too; ``Membership`` submits nothing then).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from werkzeug.exceptions import HTTPException

from chashd.config import GatewayConfig, parse_host, parse_node_id
from chashd.errors import NodeConflict, RequestError, ServiceUnavailable, UnknownNode
from chashd.gateway.clustermap import MAX_SEQ, MAX_WEIGHT, ClusterView, Outcome, OutcomeCode
from chashd.gateway.raft import RaftStatus
from chashd.node import NodeInfo, NodeState
from chashd.record import check_key
from chashd.ring import key_hash
from chashd.web import (
    Forbidden,
    KeyPathConverter,
    Unauthorized,
    check_bearer,
    error_problem,
    json_response,
    routing_problem,
    undecodable_path,
)

__all__ = ["RingAPI", "RingRoot"]


class _RoutingFeed(Protocol):
    """What the API needs of ``chashd.gateway.follow.RoutingFeed``."""

    def render(self, request: IRequest, known: str | None, timeout: float | None) -> Any: ...


class _Membership(Protocol):
    """What the API needs of ``Membership``."""

    view: ClusterView
    status: RaftStatus

    def leader_id(self) -> str | None:
        """The leader's gateway id while the map is current, else None."""

    def last_leader_id(self) -> str | None:
        """The leader's gateway id Raft names, also when not heard from within the election timeout."""

    def subscribe(self, observer: Callable[[ClusterView], None]) -> None:
        """Get every new view."""

    def unsubscribe(self, observer: Callable[[ClusterView], None]) -> None:
        """Stop getting views."""

    def register_node(
        self, node_id: str, host: str, port: int, line_port: int, weight: int, seq: int
    ) -> Deferred[Outcome]:
        """Register a node."""

    def start_leaving(self, node_id: str) -> Deferred[Outcome]:
        """Drain a node."""

    def remove(self, node_id: str) -> Deferred[Outcome]:
        """Remove a node."""


class _TooLarge(RequestError):
    """A body over the API's cap."""


#: Domain errors to (HTTP status, title): the one table of this adapter, first match wins.
_ERRORS: list[tuple[type[Exception], int, str]] = [
    (Unauthorized, 401, "Unauthorized"),
    (Forbidden, 403, "Forbidden"),
    (_TooLarge, 413, "Payload Too Large"),
    (UnknownNode, 404, "Not Found"),
    (NodeConflict, 409, "Conflict"),
    (RequestError, 400, "Bad Request"),
    (ServiceUnavailable, 503, "Service Unavailable"),
]

#: Outcome codes that are refusals, to the domain error raised for them.
_REFUSALS: dict[OutcomeCode, type[RequestError]] = {
    OutcomeCode.UNKNOWN: UnknownNode,
    OutcomeCode.CONFLICT: NodeConflict,
    OutcomeCode.STALE: NodeConflict,
    OutcomeCode.INVALID: RequestError,
}


@dataclass
class _Waiter:
    after: int
    deferred: Deferred[ClusterView]
    timer: IDelayedCall | None = None


def _node_json(node: NodeInfo) -> dict[str, Any]:
    return node.to_dict()


class RingAPI:
    """The ``/ring`` routes over a ``Membership``.

    ``status_extra()`` returns more fields for ``GET /ring/status`` (the rebalancing work feeds its
    per-node keys and handoff progress through it).
    """

    app = Klein()
    app.url_map.converters["key"] = KeyPathConverter
    _log = Logger()

    #: Largest request body (a registration is about 150 bytes).
    max_body = 8192
    #: Most ``GET /ring?after=`` requests waiting at once; more get a 503.
    max_waiters = 1024
    #: Longest and default wait of a long poll, in seconds.
    max_wait = 60.0
    default_wait = 30.0

    def __init__(
        self,
        membership: _Membership,
        config: GatewayConfig,
        clock: IReactorTime,
        status_extra: Callable[[], dict[str, Any]] | None = None,
        routing: _RoutingFeed | None = None,
    ) -> None:
        self._membership = membership
        self._routing = routing
        self._config = config
        self._clock = clock
        self._token = config.token.encode() if config.token else None
        self._status_extra = status_extra or dict
        self._waiters: list[_Waiter] = []
        self._ring_cache: tuple[ClusterView, bytes] | None = None
        membership.subscribe(self._view_changed)

    def resource(self) -> IResource:
        """The twisted.web resource to serve."""
        return self.app.resource()

    def close(self) -> None:
        """Answer every waiting long poll now and stop following the map."""
        self._membership.unsubscribe(self._view_changed)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._wake(waiter)

    # -- the ring ---------------------------------------------------------------------------------

    def _ring_body(self, view: ClusterView) -> bytes:
        cache = self._ring_cache
        if cache is not None and cache[0] is view:
            return cache[1]
        ring = view.ring.to_dict()
        for item in ring["nodes"]:
            node = view.node(item["id"])
            if node is not None:
                item.update(host=node.host, port=node.port, line_port=node.line_port, state=node.state.value)
        ring["leaving"] = [_node_json(n) for n in view.nodes_in(NodeState.LEAVING)]
        ring["replicas"] = max(1, min(self._config.replicas, len(view.ring)))  # N of this ring, as the router caps it
        ring["gateways"] = [g.to_dict() for g in view.gateways]
        body = json.dumps(ring, sort_keys=True).encode() + b"\n"
        self._ring_cache = (view, body)
        return body

    def _ring_answer(self, view: ClusterView, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"X-Chash-Epoch", b"%d" % view.epoch)
        return self._ring_body(view)

    @app.route("/ring", methods=["GET", "HEAD"])
    def ring(self, request: IRequest) -> Any:
        """The ring; with ``after``, a long poll for the next epoch."""
        after = _query_number(request, "after", int)
        timeout = _query_number(request, "timeout", float)
        view = self._membership.view
        if after is None or view.epoch > after:
            return self._ring_answer(view, request)
        wait = min(self.max_wait, self.default_wait if timeout is None else timeout)
        if wait <= 0:
            return self._ring_answer(view, request)
        if len(self._waiters) >= self.max_waiters:
            raise ServiceUnavailable(f"{len(self._waiters)} requests already wait for the next epoch")
        return self._wait(int(after), wait).addCallback(self._ring_answer, request)

    def _wait(self, after: int, timeout: float) -> Deferred[ClusterView]:
        waiter = _Waiter(after, Deferred(lambda _: self._drop(waiter)))
        waiter.timer = self._clock.callLater(timeout, self._expire, waiter)
        self._waiters.append(waiter)
        return waiter.deferred

    def _drop(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None

    def _expire(self, waiter: _Waiter) -> None:
        waiter.timer = None
        self._drop(waiter)
        self._wake(waiter)

    def _wake(self, waiter: _Waiter) -> None:
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None
        if not waiter.deferred.called:
            waiter.deferred.callback(self._membership.view)

    def _view_changed(self, view: ClusterView) -> None:
        ready = [w for w in self._waiters if view.epoch > w.after]
        if not ready:
            return
        self._waiters = [w for w in self._waiters if view.epoch <= w.after]
        for waiter in ready:
            self._wake(waiter)

    # -- status and lookups ------------------------------------------------------------------------

    @app.route("/ring/placement", methods=["GET", "HEAD"])
    def placement(self, request: IRequest) -> Any:
        """The routing this gateway follows; with ``known``, a long poll for another."""
        if self._routing is None:
            raise ServiceUnavailable("this gateway publishes no routing")
        values = (request.args or {}).get(b"known")
        known = values[0].decode("ascii", "replace") if values else None
        return self._routing.render(request, known, _query_number(request, "timeout", float))

    @app.route("/ring/status", methods=["GET", "HEAD"])
    def status(self, request: IRequest) -> bytes:
        """The gateway's view of the cluster."""
        return json_response(request, self.status_body())

    def status_body(self) -> dict[str, Any]:
        """The body of ``GET /ring/status`` (the status page shows the same)."""
        view = self._membership.view
        raft = self._membership.status
        body: dict[str, Any] = {
            "gateway_id": self._config.gateway_id,
            # The leader only while this gateway leads or heard from it within its election timeout
            # (map_current): a follower cut off from the others still names its last leader (pysyncobj holds
            # no election without a connection) and counts its connections as a quorum until they time out;
            # that name is last_leader.
            "leader": self._membership.leader_id(),
            "leader_raft": raft.leader if raft.in_contact else None,
            "last_leader": self._membership.last_leader_id(),
            "is_leader": raft.is_leader,
            "has_quorum": raft.has_quorum,
            "map_current": raft.in_contact,
            "epoch": view.epoch,
            "replicas": self._config.replicas,
            "write_quorum": self._config.write_quorum,
            "read_quorum": self._config.read_quorum,
            "points_per_node": view.ring.points_per_node,
            "nodes": [_node_json(n) for n in view.nodes],
            "gateways": [g.to_dict() for g in view.gateways],
            "rebalancing": False,
        }
        body.update(self._status_extra())
        return body

    @app.route("/ring/lookup/<key:key>", methods=["GET", "HEAD"])
    def lookup(self, request: IRequest, key: str) -> bytes:
        """The key's preference list."""
        raw = check_key(key.encode("utf-8"))
        view = self._membership.view
        n = max(1, min(self._config.replicas, len(view.ring)))
        names = view.ring.preference_list(raw, n) if len(view.ring) else ()
        nodes = []
        for name in names:
            node = view.node(name)
            if node is not None:
                nodes.append(_node_json(node))
        return json_response(
            request,
            {"key": key, "hash": key_hash(raw), "epoch": view.epoch, "replicas": n, "nodes": nodes},
        )

    @app.route("/ring/nodes", methods=["GET", "HEAD"])
    def nodes(self, request: IRequest) -> bytes:
        """Every node of the map."""
        view = self._membership.view
        return json_response(request, {"epoch": view.epoch, "nodes": [_node_json(n) for n in view.nodes]})

    @app.route("/ring/nodes/<node_id>", methods=["GET", "HEAD"])
    def node(self, request: IRequest, node_id: str) -> bytes:
        """One node."""
        view = self._membership.view
        node = view.node(node_id)
        if node is None:
            raise UnknownNode(f"no node {node_id!r} in the ring")
        return json_response(request, {"epoch": view.epoch, "node": _node_json(node)})

    # -- admin ------------------------------------------------------------------------------------

    @app.route("/ring/nodes", methods=["POST"])
    def register(self, request: IRequest) -> Any:
        """Register (or refresh) a node."""
        self._authorize(request)
        body = self._json_body(request)
        node_id = _field(body, "id", parse_node_id)
        host = _field(body, "host", parse_host)
        port = _integer(body, "port", 1, 65535)
        line_port = _integer(body, "line_port", 1, 65535)
        weight = _integer(body, "weight", 1, MAX_WEIGHT, default=100)
        seq = _integer(body, "seq", 0, MAX_SEQ, default=0)
        d = self._membership.register_node(node_id, host, port, line_port, weight, seq)
        return d.addCallback(self._answer, request, node_id)

    @app.route("/ring/nodes/<node_id>/drain", methods=["POST"])
    def drain(self, request: IRequest, node_id: str) -> Any:
        """Start a node's drain."""
        self._authorize(request)
        return self._membership.start_leaving(node_id).addCallback(self._answer, request, node_id)

    @app.route("/ring/nodes/<node_id>", methods=["DELETE"])
    def remove(self, request: IRequest, node_id: str) -> Any:
        """Remove a node from the map."""
        self._authorize(request)
        return self._membership.remove(node_id).addCallback(self._answer, request, node_id)

    def _answer(self, outcome: Outcome, request: IRequest, node_id: str) -> bytes:
        refusal = _REFUSALS.get(outcome.code)
        if refusal is not None:
            raise refusal(outcome.detail or f"{outcome.code}: node {node_id!r}")
        if not outcome.changed and outcome.code != OutcomeCode.UNCHANGED:
            raise RuntimeError(f"the cluster map failed to apply the change: {outcome.detail}")
        node = self._membership.view.node(node_id)
        body = {"result": outcome.code.value, "epoch": outcome.epoch, "node": _node_json(node) if node else None}
        return json_response(request, body, 201 if outcome.code == OutcomeCode.REGISTERED else 200)

    def _authorize(self, request: IRequest) -> None:
        check_bearer(request, self._token)

    def _json_body(self, request: IRequest) -> dict[str, Any]:
        length = request.getHeader(b"Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_body:
            raise _TooLarge(f"the body of {int(length)} bytes is over the limit of {self.max_body} bytes")
        raw = request.content.read(self.max_body + 1) if request.content is not None else b""
        if len(raw) > self.max_body:
            raise _TooLarge(f"the body is over the limit of {self.max_body} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"the body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        return body

    # -- errors -----------------------------------------------------------------------------------

    @app.handle_errors(HTTPException)
    def _routing_error(self, request: IRequest, failure: Failure) -> bytes:
        return routing_problem(request, failure)

    @app.handle_errors(Exception)
    def _error(self, request: IRequest, failure: Failure) -> bytes:
        return error_problem(request, failure, _ERRORS, self._log)


def _query_number(request: IRequest, name: str, kind: type[int] | type[float]) -> float | None:
    values = (request.args or {}).get(name.encode())
    if not values:
        return None
    text = values[0].decode("ascii", "replace").strip()
    try:
        value = kind(text)
    except ValueError:
        raise RequestError(f"query parameter {name}: {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise RequestError(f"query parameter {name}: {text!r} must be a finite number, not negative")
    return value


def _field(body: dict[str, Any], name: str, parse: Callable[[object], str]) -> str:
    if name not in body or not isinstance(body[name], str):
        raise RequestError(f"field {name!r} is required and must be a string")
    try:
        return parse(body[name])
    except ValueError as e:
        raise RequestError(f"field {name!r}: {e}") from None


def _integer(body: dict[str, Any], name: str, low: int, high: int, default: int | None = None) -> int:
    value = body.get(name, default)
    if value is None:
        raise RequestError(f"field {name!r} is required")
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"field {name!r} must be an integer from {low} to {high}, not {value!r}")
    return value


class RingRoot(Resource):
    """The gateway's HTTP root: ``/ring`` and below go to ``ring``, ``/`` and ``/status/...`` to ``page``
    (the status page) when there is one, everything else to ``other``.

    A leaf, so each Klein resource sees the whole path and routes it as if it were the root.
    """

    isLeaf = True

    def __init__(self, ring: IResource, other: IResource, page: IResource | None = None) -> None:
        super().__init__()
        self._ring = ring
        self._other = other
        self._page = page or other

    def render(self, request: IRequest) -> Any:
        postpath = request.postpath
        first = postpath[0] if postpath else b""
        if first == b"ring":
            target = self._ring
        elif (first == b"" and len(postpath) <= 1) or first == b"status":
            target = self._page
        else:
            return self._other.render(request)  # which answers a path that is not UTF-8 itself
        refusal = undecodable_path(request)
        return refusal if refusal is not None else target.render(request)
