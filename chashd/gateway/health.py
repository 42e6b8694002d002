"""Health checking of the kvstore nodes, by the Raft leader only.

Every ``interval`` seconds the leader probes each node of the map (``GET /health``, one probe in flight
per node, each bounded by a timeout). After ``down_after`` consecutive failures it marks an ``up`` node
``down`` (still in the ring, skipped by routing); a later success marks it ``up`` again. A node that has
been ``down`` for ``dead_after`` seconds is removed from the map, which triggers re-replication; so is a
``leaving`` node that stopped answering for as long (its drain cannot finish).

The counters live on the leader only. A new leader starts counting afresh: a node that was already
``down`` is removed ``dead_after`` seconds after the new leader first saw it down, never earlier, so a
leader change can delay a removal but never hasten one. When this gateway stops leading, it forgets its
counters and cancels its probes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from chashd.gateway.clustermap import ClusterView, Outcome
from chashd.node import NodeInfo, NodeState

__all__ = ["HealthChecker", "http_probe"]

Probe = Callable[[NodeInfo], "Deferred[bool]"]


class _Membership(Protocol):
    """What the checker needs of ``Membership``."""

    view: ClusterView

    @property
    def is_leader(self) -> bool:
        """True while this gateway leads."""

    def mark_down(self, node_id: str) -> Deferred[Outcome]:
        """Mark a node down."""

    def mark_up(self, node_id: str) -> Deferred[Outcome]:
        """Mark a node up."""

    def remove(self, node_id: str) -> Deferred[Outcome]:
        """Remove a node."""


class HealthChecker(Service):
    """Probes the nodes while this gateway is the Raft leader and changes their state in the map.

    ``probe(node)`` fires with True when the node is healthy (False or a failure otherwise); the
    production one is ``http_probe``.
    """

    _log = Logger()

    def __init__(
        self,
        membership: _Membership,
        probe: Probe,
        clock: IReactorTime,
        interval: float = 1.0,
        down_after: int = 3,
        dead_after: float = 60.0,
        probe_timeout: float | None = None,
    ) -> None:
        self._membership = membership
        self._probe = probe
        self._clock = clock
        self.interval = interval
        self.down_after = down_after
        self.dead_after = dead_after
        self.probe_timeout = probe_timeout if probe_timeout is not None else max(0.5, min(5.0, 2 * interval))
        self.failures: dict[str, int] = {}
        self.down_since: dict[str, float] = {}
        self._inflight: dict[str, Deferred[bool]] = {}
        self._changing: set[str] = set()
        self._loop: LoopingCall | None = None
        self._leading = False

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._round)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=True).addErrback(self._loop_died)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self._reset()

    def _loop_died(self, failure: Failure) -> None:  # pragma: no cover - _round catches everything
        self._log.failure("the health check loop stopped", failure)

    def _reset(self) -> None:
        inflight, self._inflight = self._inflight, {}
        for d in inflight.values():
            d.cancel()
        self.failures.clear()
        self.down_since.clear()

    # -- one round ----------------------------------------------------------------------------------

    def _round(self) -> None:
        try:
            if not self._membership.is_leader:
                if self._leading:
                    self._log.info("no longer the Raft leader: health checks stop here")
                    self._leading = False
                    self._reset()
                return
            if not self._leading:
                self._log.info("Raft leader: health checks of the kvstores start here")
                self._leading = True
            view = self._membership.view
            now = self._clock.seconds()
            present = {node.id for node in view.nodes}
            for table in (self.failures, self.down_since):
                for node_id in [n for n in table if n not in present]:
                    del table[node_id]
            for node in view.nodes:
                self._check_dead(node, now)
                if node.id not in self._inflight and self._membership.view.node(node.id) is not None:
                    self._start_probe(node)
        except Exception:
            self._log.failure("health check round failed")

    def _check_dead(self, node: NodeInfo, now: float) -> None:
        failing = node.state == NodeState.DOWN or (
            node.state == NodeState.LEAVING and self.failures.get(node.id, 0) >= self.down_after
        )
        if not failing:
            self.down_since.pop(node.id, None)
            return
        since = self.down_since.setdefault(node.id, now)
        if now - since >= self.dead_after:
            self._change(
                node.id,
                "remove",
                "node {node_id} has been unreachable for {seconds:.0f}s: removing it from the ring",
                seconds=now - since,
            )

    def _start_probe(self, node: NodeInfo) -> None:
        d: Deferred[bool] = maybeDeferred(self._probe, node)
        d.addTimeout(self.probe_timeout, self._clock)
        self._inflight[node.id] = d
        d.addBoth(self._probed, node.id, d)

    def _probed(self, result: bool | Failure, node_id: str, d: Deferred[bool]) -> None:
        if self._inflight.get(node_id) is not d:
            return  # cancelled by a reset, or superseded
        del self._inflight[node_id]
        try:
            self._judge(node_id, result)
        except Exception:
            self._log.failure("health check of node {node_id} failed", node_id=node_id)

    def _judge(self, node_id: str, result: bool | Failure) -> None:
        node = self._membership.view.node(node_id)
        if node is None or not self._leading:
            self.failures.pop(node_id, None)
            self.down_since.pop(node_id, None)
            return
        if result is True:
            self.failures.pop(node_id, None)
            self.down_since.pop(node_id, None)
            if node.state == NodeState.DOWN:
                self._change(node_id, "mark_up", "node {node_id} answers again: marking it up")
            return
        count = self.failures.get(node_id, 0) + 1
        self.failures[node_id] = count
        if count in (1, self.down_after):
            self._log.info(
                "health probe {count} of node {node_id} failed: {error}",
                count=count,
                node_id=node_id,
                error=result.getErrorMessage() if isinstance(result, Failure) else "not healthy",
            )
        if count >= self.down_after and node.state == NodeState.UP:
            self._change(
                node_id, "mark_down", "node {node_id} failed {count} health probes: marking it down", count=count
            )
        if count >= self.down_after:
            self.down_since.setdefault(node_id, self._clock.seconds())

    def _change(self, node_id: str, op: str, message: str, **fields: Any) -> None:
        if node_id in self._changing:
            return
        self._changing.add(node_id)
        self._log.info(message, node_id=node_id, **fields)
        d: Deferred[Outcome] = getattr(self._membership, op)(node_id)

        def done(result: Outcome | Failure) -> None:
            self._changing.discard(node_id)
            if op == "remove" and isinstance(result, Outcome):
                self.failures.pop(node_id, None)
                self.down_since.pop(node_id, None)
            if isinstance(result, Failure):
                self._log.warn(
                    "cannot {op} node {node_id} yet: {error}", op=op, node_id=node_id, error=result.getErrorMessage()
                )

        d.addBoth(done)


def http_probe(client: Any, timeout: float = 1.0) -> Probe:
    """A ``probe`` over a ``treq.client.HTTPClient``: ``GET http://host:port/health`` answers 200."""

    def probe(node: NodeInfo) -> Deferred[bool]:
        host = f"[{node.host}]" if ":" in node.host else node.host
        d: Deferred[Any] = client.get(f"http://{host}:{node.port}/health", timeout=timeout)

        def check(response: Any) -> Deferred[bool]:
            ok = response.code == 200
            return response.content().addCallback(lambda _: ok)  # type: ignore[no-any-return]

        return d.addCallback(check)

    return probe
