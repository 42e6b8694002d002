"""The routing of a Raft gateway, served to and followed by the data planes that have no Raft of their own.

``RoutingFeed`` serves ``GET /ring/placement`` on a gateway that runs Raft: the ``Routing`` its own router
follows (``chashd.gateway.dataplane``), as JSON, with its tag in ``X-Chash-Placement``. With
``?known=<tag>&timeout=<s>`` the answer waits until the routing's tag differs from ``known`` (or the timeout,
at most 60 s, passes, then the same routing comes back), so a follower hears of each change at once. With a
cluster token configured the route needs ``Authorization: Bearer <token>``: it tells where every kvstore
listens.

``RoutingWatch`` is the follower's side, the kvstores' ring watch on another route: one long poll at a time
through the cluster client to the gateways (``--follow``), the next one after a failure (with a backoff),
and every routing of a newer or equal epoch with another tag goes to ``on_routing``. Routings of an older
epoch are skipped: gateways whose Raft logs lag may answer one after a newer one was seen. A gateway's
workers follow their own gateway's feed this way, and so do the gateways started with ``--follow``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web.iweb import IRequest

from chashd.client import AsyncKVStoreClient
from chashd.errors import ServiceUnavailable
from chashd.gateway.dataplane import Routing
from chashd.kvstore.ringwatch import RingWatch
from chashd.web import check_bearer

__all__ = ["FOLLOW_TIMEOUT", "RoutingFeed", "RoutingWatch"]

#: Seconds a request for the routing may take (a long poll waits its 25 s more on purpose).
FOLLOW_TIMEOUT = 10.0


class RoutingFeed:
    """The current ``Routing`` of this gateway and the long polls that wait for the next one."""

    #: Most requests waiting at once; more get a 503.
    max_waiters = 1024
    #: Longest and default wait of a long poll, in seconds.
    max_wait = 60.0
    default_wait = 30.0

    def __init__(self, clock: IReactorTime, token: str | None = None) -> None:
        self._clock = clock
        self._token = token.encode() if token else None
        self.routing: Routing | None = None
        self._body = b""
        self._waiters: dict[Deferred[None], IDelayedCall] = {}

    def publish(self, routing: Routing) -> None:
        """Serve ``routing`` from now on; the waiting polls get it when its tag is new."""
        if self.routing is not None and self.routing.tag == routing.tag:
            self.routing = routing
            return
        self.routing = routing
        self._body = json.dumps(routing.to_json(), sort_keys=True).encode() + b"\n"
        self.wake()

    def wake(self) -> None:
        """Answer every waiting poll now (a new routing, or the gateway stops)."""
        waiters, self._waiters = self._waiters, {}
        for waiter, timer in waiters.items():
            if timer.active():
                timer.cancel()
            waiter.callback(None)

    def render(self, request: IRequest, known: str | None, timeout: float | None) -> Any:
        """The answer to ``GET /ring/placement`` (bytes, or a Deferred of them while it waits)."""
        check_bearer(request, self._token)
        if self.routing is None:
            raise ServiceUnavailable("this gateway has no routing yet")
        wait = min(self.max_wait, self.default_wait if timeout is None else timeout)
        if known is None or known != self.routing.tag or wait <= 0:
            return self._answer(request)
        if len(self._waiters) >= self.max_waiters:
            raise ServiceUnavailable(f"{len(self._waiters)} requests already wait for the next placement")
        waiter: Deferred[None] = Deferred(self._forget)
        self._waiters[waiter] = self._clock.callLater(wait, self._expire, waiter)
        return waiter.addCallback(lambda _: self._answer(request))

    def _forget(self, waiter: Deferred[None]) -> None:
        timer = self._waiters.pop(waiter, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _expire(self, waiter: Deferred[None]) -> None:
        if self._waiters.pop(waiter, None) is not None:
            waiter.callback(None)

    def _answer(self, request: IRequest) -> bytes:
        assert self.routing is not None
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"X-Chash-Placement", self.routing.tag.encode())
        return self._body


class RoutingWatch(RingWatch):
    """Follows the routing of the gateways of ``client`` and hands each new one to ``on_routing`` (the
    kvstores' ring watch, on ``GET /ring/placement``)."""

    what = "routing watch"

    def __init__(
        self,
        client: AsyncKVStoreClient,
        clock: IReactorTime,
        on_routing: Callable[[Routing], None],
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(client, clock, on_routing, max_backoff=5.0, rng=rng)

    def _ask(self, latest: Any) -> Deferred[dict[str, Any]]:
        return self._client.placement(known=None if latest is None else latest.tag, wait=self.poll_timeout)

    def _parse(self, body: dict[str, Any]) -> Routing:
        return Routing.from_json(body)

    def _newer(self, update: Routing, latest: Routing) -> bool:
        return update.epoch > latest.epoch or (update.epoch == latest.epoch and update.tag != latest.tag)
