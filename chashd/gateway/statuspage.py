# -*- test-case-name: tests.unit.test_statuspage,tests.integration.test_status_page -*-
"""The gateway's status page (Klein): what an operator looks at first, with no build step and no external asset.

Routes::

    GET /                    the page: the ring as a circle (SVG), the nodes, the gateways with the leader
                             marked, epoch and N/W/R, the request counters with their rates
    GET /status/main         the page's <main> alone; static/refresh.js fetches it every few seconds
    GET /status/ring.svg     the ring picture alone (what ``chash ring --svg`` writes)
    GET /status/style.css    static/style.css
    GET /status/refresh.js   static/refresh.js

Everything is rendered here from the same figures as ``GET /ring/status`` and ``GET /stats`` (``status``,
``ring`` and ``stats`` are callables, so the page knows nothing of Raft or of the router). Rates are the
counters' change between two renderings at least a second apart (over the last ``rate_window`` seconds or
less). A gateway that knows no Raft leader, or reaches no majority of the gateways, says so at the top, with
the time it first rendered so.
A Content-Security-Policy keeps the page to its own files.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from functools import cache
from html import escape
from importlib.resources import files
from string import Template
from typing import Any

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from chashd.node import NodeState
from chashd.ring import HashRing
from chashd.ringsvg import node_colours, ring_svg

__all__ = ["COUNTERS", "StatusPage"]

#: The counters shown, with their labels: the router's requests first, then what went wrong or was mended
#: (the error replies of each surface, as chashd_request_errors_total counts them).
COUNTERS = (
    ("cmd_get", "get (keys read)"),
    ("get_hits", "get hits"),
    ("get_misses", "get misses"),
    ("cmd_set", "set"),
    ("cmd_delete", "delete"),
    ("cmd_rmw", "read-modify-write (add, cas, incr ...)"),
    ("quorum_failures", "quorum failures (errors)"),
    ("read_repairs", "read repairs"),
    ("line_client_errors", "line protocol: client errors"),
    ("line_server_errors", "line protocol: server errors"),
    ("http_client_errors", "HTTP: client errors (4xx)"),
    ("http_server_errors", "HTTP: server errors (5xx)"),
)

_SECURITY_HEADERS = {
    b"Content-Security-Policy": b"default-src 'none'; style-src 'self'; script-src 'self'; connect-src 'self'; "
    b"img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    b"X-Content-Type-Options": b"nosniff",
    b"Cache-Control": b"no-store",
}


@cache
def _static(name: str) -> str:
    return files("chashd.gateway").joinpath("static", name).read_text(encoding="utf-8")


def _clock_time(seconds: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(seconds))


def _number(value: Any) -> str:
    return "—" if value is None else escape(str(value))


def _handoff(handoff: dict[str, Any] | None) -> tuple[str, str]:
    """(synced epoch, progress) cells from a node's report."""
    if not handoff:
        return "—", "—"
    synced = _number(handoff.get("synced_epoch"))
    if handoff.get("running"):
        progress = (
            f"moving: {_number(handoff.get('arcs_done'))}/{_number(handoff.get('arcs_total'))} arcs, "
            f"{_number(handoff.get('pending'))} records pending"
        )
    elif handoff.get("synced_epoch") != handoff.get("target_epoch"):
        progress = f"waiting for epoch {_number(handoff.get('target_epoch'))}"
    else:
        progress = "idle"
    return synced, progress


class StatusPage:
    """The status page over a gateway's figures.

    ``status()`` returns the body of ``GET /ring/status``, ``ring()`` the current ``HashRing``, ``stats()``
    the router's counters (``GET /stats``).
    """

    app = Klein()

    #: Seconds between the page's own refreshes (static/refresh.js reads it from the page).
    refresh_seconds = 2
    #: Rates are taken over at most this many seconds of samples.
    rate_window = 10.0

    def __init__(
        self,
        status: Callable[[], dict[str, Any]],
        ring: Callable[[], HashRing],
        stats: Callable[[], dict[str, Any]],
        clock: IReactorTime,
    ) -> None:
        self._status = status
        self._ring = ring
        self._stats = stats
        self._clock = clock
        self._samples: deque[tuple[float, dict[str, Any]]] = deque(maxlen=64)
        self._no_leader_since: float | None = None

    def resource(self) -> IResource:
        """The twisted.web resource to serve."""
        return self.app.resource()

    # -- routes -----------------------------------------------------------------------------------

    @app.route("/", methods=["GET", "HEAD"])
    def page(self, request: IRequest) -> bytes:
        """The whole page."""
        status = self._status()
        body = Template(_static("status.html")).substitute(
            gateway_id=escape(str(status.get("gateway_id", ""))),
            refresh_seconds=self.refresh_seconds,
            main=self.render_main(status),
        )
        return self._answer(request, b"text/html; charset=utf-8", body)

    @app.route("/status/main", methods=["GET", "HEAD"])
    def main(self, request: IRequest) -> bytes:
        """The page's <main> alone, for refresh.js."""
        return self._answer(request, b"text/html; charset=utf-8", self.render_main(self._status()))

    @app.route("/status/ring.svg", methods=["GET", "HEAD"])
    def ring_picture(self, request: IRequest) -> bytes:
        """The ring as a standalone SVG document."""
        return self._answer(request, b"image/svg+xml", self._ring_svg(self._status()))

    @app.route("/status/style.css", methods=["GET", "HEAD"])
    def style(self, request: IRequest) -> bytes:
        """The page's style sheet."""
        return self._answer(request, b"text/css; charset=utf-8", _static("style.css"))

    @app.route("/status/refresh.js", methods=["GET", "HEAD"])
    def script(self, request: IRequest) -> bytes:
        """The page's script: refresh <main>, say when the gateway does not answer."""
        return self._answer(request, b"text/javascript; charset=utf-8", _static("refresh.js"))

    def _answer(self, request: IRequest, content_type: bytes, text: str) -> bytes:
        request.setHeader(b"Content-Type", content_type)
        for name, value in _SECURITY_HEADERS.items():
            request.setHeader(name, value)
        return text.encode("utf-8")

    # -- rendering --------------------------------------------------------------------------------

    def _ring_svg(self, status: dict[str, Any]) -> str:
        states = {node["id"]: node.get("state", NodeState.UP) for node in status.get("nodes", [])}
        return ring_svg(self._ring(), states)

    def render_main(self, status: dict[str, Any]) -> str:
        """The inside of <main>: summary, ring, nodes, gateways, requests."""
        now = self._clock.seconds()
        return "\n".join(
            [
                self._summary(status, now),
                f'<section id="ring">{self._ring_svg(status)}</section>',
                self._nodes(status),
                self._gateways(status),
                self._requests(now),
            ]
        )

    @staticmethod
    def _leader(status: dict[str, Any]) -> str | None:
        """The leader this gateway can count on: None without one, or without a Raft majority in reach
        (``leader`` is already None when it has not heard from it within the election timeout)."""
        leader = status.get("leader")
        current = status.get("has_quorum") and status.get("map_current", True)
        return str(leader) if leader is not None and current else None

    def _summary(self, status: dict[str, Any], now: float) -> str:
        # An isolated follower still names its last leader (pysyncobj keeps it until it can hold an
        # election, and counts its connections as a quorum until they time out): last_leader.
        named = status.get("last_leader", status.get("leader"))
        leader = self._leader(status)
        parts = []
        if leader is None:
            if self._no_leader_since is None:
                self._no_leader_since = now
            why = (
                "knows no Raft leader"
                if named is None
                else f"reaches no majority of the gateways (its last leader, {escape(str(named))}, is out of reach)"
            )
            parts.append(
                f'<p id="leader-lost" class="alert">This gateway {why} since {_clock_time(self._no_leader_since)} '
                "at the latest: the cluster map cannot change (no node joins, drains or is marked down) until a "
                "majority of the gateways reach each other. Keys are still served on the last ring.</p>"
            )
        else:
            self._no_leader_since = None
        rebalancing = "rebalancing" if status.get("rebalancing") else "stable"
        parts.append(
            '<p class="summary">'
            f'leader <b id="leader">{escape(leader) if leader else "none"}</b> · '
            f'epoch <b id="epoch">{_number(status.get("epoch"))}</b> · '
            f'<span id="quorums">N={_number(status.get("replicas"))} W={_number(status.get("write_quorum"))} '
            f"R={_number(status.get('read_quorum'))}</span> · "
            f'<span id="rebalancing">{rebalancing}</span> · '
            f'<span class="muted">rendered {_clock_time(now)}</span></p>'
        )
        return f'<section id="summary">{"".join(parts)}</section>'

    def _nodes(self, status: dict[str, Any]) -> str:
        nodes = status.get("nodes", [])
        ring = self._ring()
        shares = ring.shares()
        colours = node_colours([n["id"] for n in nodes] + list(ring.nodes))
        rows = []
        for node in sorted(nodes, key=lambda n: n["id"]):
            node_id = node["id"]
            state = str(node.get("state", ""))
            synced, progress = _handoff(node.get("handoff"))
            share = f"{100 * shares[node_id]:.1f}%" if node_id in shares else "—"
            rows.append(
                f'<tr data-node="{escape(node_id)}" data-state="{escape(state)}" class="state-{escape(state)}">'
                f'<td><svg class="swatch" width="12" height="12" aria-hidden="true"><rect width="12" height="12" '
                f'fill="{colours[node_id]}"/></svg>{escape(node_id)}</td>'
                f"<td>{escape(str(node.get('host')))}:{_number(node.get('port'))} "
                f'<span class="muted">line {_number(node.get("line_port"))}</span></td>'
                f'<td class="state">{escape(state)}</td>'
                f'<td class="number">{_number(node.get("weight"))}</td>'
                f'<td class="number share">{share}</td>'
                f'<td class="number keys">{_number(node.get("keys"))}</td>'
                f'<td class="number">{synced}</td><td class="handoff">{progress}</td></tr>'
            )
        if not rows:
            rows.append('<tr><td colspan="8" class="muted">no kvstore has registered yet</td></tr>')
        return (
            '<section><h2>Nodes</h2><table id="nodes"><thead><tr><th>node</th><th>address</th><th>state</th>'
            '<th class="number">weight</th><th class="number">share</th><th class="number">keys</th>'
            '<th class="number">synced epoch</th><th>handoff</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></section>"
        )

    def _gateways(self, status: dict[str, Any]) -> str:
        leader = self._leader(status)
        me = status.get("gateway_id")
        rows = []
        for gateway in sorted(status.get("gateways", []), key=lambda g: g["id"]):
            gateway_id = gateway["id"]
            role = "leader" if gateway_id == leader else "follower"
            mark = '<span class="leader-mark">★ leader</span>' if role == "leader" else "follower"
            url = escape(str(gateway.get("url", "")))
            rows.append(
                f'<tr data-gateway="{escape(gateway_id)}" data-role="{role}">'
                f"<td>{escape(gateway_id)}{' <span class=muted>(this page)</span>' if gateway_id == me else ''}</td>"
                f'<td><a href="{url}/">{url}</a></td><td>{escape(str(gateway.get("raft", "")))}</td>'
                f"<td>{mark}</td></tr>"
            )
        if not rows:
            rows.append('<tr><td colspan="4" class="muted">no gateway in the cluster map yet</td></tr>')
        return (
            '<section><h2>Gateways</h2><table id="gateways"><thead><tr><th>gateway</th><th>HTTP</th><th>Raft</th>'
            f"<th>role</th></tr></thead><tbody>{''.join(rows)}</tbody></table></section>"
        )

    def _rates(self, now: float, stats: dict[str, Any]) -> tuple[dict[str, float], float] | None:
        """Per-second rates against the oldest sample within the window; keeps this sample."""
        samples = self._samples
        while samples and now - samples[0][0] > self.rate_window:
            samples.popleft()
        base = samples[0] if samples and now - samples[0][0] >= 1.0 else None
        if not samples or now - samples[-1][0] >= 1.0:
            samples.append((now, dict(stats)))
        if base is None:
            return None
        elapsed = now - base[0]
        rates = {}
        for name, _ in COUNTERS:
            current, before = stats.get(name), base[1].get(name)
            if isinstance(current, (int, float)) and isinstance(before, (int, float)):
                rates[name] = max(0.0, (current - before) / elapsed)
        return rates, elapsed

    def _requests(self, now: float) -> str:
        stats = self._stats()
        rated = self._rates(now, stats)
        rows = []
        for name, label in COUNTERS:
            rate = f"{rated[0][name]:.1f}" if rated and name in rated[0] else '<span class="muted">—</span>'
            rows.append(
                f'<tr data-counter="{name}"><td>{escape(label)}</td>'
                f'<td class="number total">{_number(stats.get(name))}</td><td class="number rate">{rate}</td></tr>'
            )
        window = f"over the last {rated[1]:.0f} s" if rated else "after the next refresh"
        return (
            f'<section><h2>Requests <span class="muted">(this gateway; rates {window})</span></h2>'
            '<table id="requests"><thead><tr><th>counter</th><th class="number">total</th>'
            f'<th class="number">per second</th></tr></thead><tbody>{"".join(rows)}</tbody></table></section>'
        )
