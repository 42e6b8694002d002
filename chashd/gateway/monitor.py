"""The gateway's watch of the kvstores: one ``GET /health`` per node per probe interval, for everything that
needs to know how the nodes are.

Every ``interval`` seconds, on every gateway, ``NodeMonitor`` asks each node of the cluster map for its
``/health`` report (``probe(node)``; in production ``health_probe``, through the cluster client), with one
request in flight per node, each bounded by ``timeout``. Its observers (``NodeObserver``) hear, in order:

- ``round_started(view, now)`` when a round begins, before its requests leave;
- ``reported(node, report)`` for each answer (``report`` is the JSON object of ``/health``), or
  ``unreachable(node, reason)`` when a node did not answer in time, refused, or answered an error;
- ``round_done()`` once every request the round sent has its answer or its failure (a node whose request
  of an earlier round is still under way is not asked again, and does not hold the round up).

The monitor keeps each node's last report (``reports``): a failure keeps the previous one, and a node that
left the map loses its report at the next round. Its two observers are the leader's health verdicts
(``chashd.gateway.health``) and the handoff progress the router follows (``chashd.gateway.rebalance``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from chashd.client import AsyncKVStoreClient
from chashd.gateway.clustermap import ClusterView
from chashd.node import NodeInfo

__all__ = ["NodeMonitor", "NodeObserver", "Probe", "health_probe"]

#: ``probe(node)`` fires with the JSON object of the node's ``GET /health``, or fails.
Probe = Callable[[NodeInfo], Deferred[Mapping[str, Any]]]


class _View(Protocol):
    """What the monitor needs of ``Membership``: the current view of the map."""

    @property
    def view(self) -> ClusterView:
        """The map now."""


class NodeObserver(Protocol):
    """What an observer of ``NodeMonitor`` is told (see the module docstring)."""

    def round_started(self, view: ClusterView, now: float) -> None:
        """A round begins over the nodes of ``view``."""

    def reported(self, node: NodeInfo, report: Mapping[str, Any]) -> None:
        """``node`` answered its ``/health`` with ``report``."""

    def unreachable(self, node: NodeInfo, reason: str) -> None:
        """``node`` gave no report: ``reason`` says why."""

    def round_done(self) -> None:
        """Every request of the round was answered or failed."""


class NodeMonitor(Service):
    """Asks every node of ``membership.view`` for its ``/health`` each ``interval`` and tells the observers
    (``subscribe``); see the module docstring."""

    _log = Logger()

    def __init__(
        self, membership: _View, probe: Probe, clock: IReactorTime, interval: float, timeout: float | None = None
    ) -> None:
        self._membership = membership
        self._probe = probe
        self._clock = clock
        self.interval = interval
        self.timeout = timeout if timeout is not None else max(0.5, min(2.0, interval))
        #: The last report of each node of the map (a failure keeps the previous one).
        self.reports: dict[str, Mapping[str, Any]] = {}
        self._observers: list[NodeObserver] = []
        self._inflight: dict[str, Deferred[Any]] = {}
        self._loop: LoopingCall | None = None

    def subscribe(self, observer: NodeObserver) -> None:
        """Tell ``observer`` about every round from now on."""
        self._observers.append(observer)

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._round)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=True).addErrback(lambda f: self._log.failure("the node monitor stopped", f))

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        inflight, self._inflight = self._inflight, {}
        for d in inflight.values():
            d.cancel()

    def _round(self) -> None:
        try:
            view = self._membership.view
            now = self._clock.seconds()
            present = {node.id for node in view.nodes}
            for gone in [node_id for node_id in self.reports if node_id not in present]:
                del self.reports[gone]
            self._tell("round_started", view, now)
            asked = [self._ask(node) for node in view.nodes if node.id not in self._inflight]
            DeferredList(asked, consumeErrors=True).addCallback(lambda _: self._tell("round_done"))
        except Exception:
            self._log.failure("a round of the node monitor failed")

    def _ask(self, node: NodeInfo) -> Deferred[Any]:
        d: Deferred[Mapping[str, Any]] = maybeDeferred(self._probe, node)
        d.addTimeout(self.timeout, self._clock)
        self._inflight[node.id] = d
        return d.addBoth(self._answered, node, d)

    def _answered(self, result: Mapping[str, Any] | Failure, node: NodeInfo, d: Deferred[Any]) -> None:
        if self._inflight.get(node.id) is not d:
            return  # cancelled by stopService
        del self._inflight[node.id]
        if isinstance(result, Failure):
            self._tell("unreachable", node, _reason(result))
        else:
            self.reports[node.id] = result
            self._tell("reported", node, result)

    def _tell(self, what: str, *args: Any) -> None:
        for observer in self._observers:
            try:
                getattr(observer, what)(*args)
            except Exception:
                self._log.failure("{observer} failed on {what}", observer=type(observer).__name__, what=what)


def _reason(failure: Failure) -> str:
    from twisted.internet.defer import CancelledError, TimeoutError

    if failure.check(CancelledError, TimeoutError):
        return "timed out"
    return failure.getErrorMessage()


def health_probe(client: Any, clock: IReactorTime, timeout: float, scheme: str = "http") -> Probe:
    """A ``probe`` through the cluster client over ``client`` (a treq client: ``chashd.client.http_client``):
    the JSON object of ``GET /health`` at the node's HTTP address (``https`` when the kvstores' HTTP ports
    are TLS)."""

    def probe(node: NodeInfo) -> Deferred[Mapping[str, Any]]:
        url = node.url(scheme)
        health: Deferred[Any] = AsyncKVStoreClient(client, [url], timeout=timeout, reactor=clock).health()
        return health

    return probe
