"""The kvstore's watch of the ring: a long poll of ``GET /ring`` on the gateways.

The node asks ``GET /ring?after=<the last epoch it knows>&timeout=25`` through the cluster client (its
``ring``), which asks the gateway that answered last first; the gateway answers at once when its epoch is
newer, else when the next epoch comes (or after 25 s, with the same ring). Each answer with a newer epoch
goes to ``on_ring`` as a ``RingUpdate`` (``chashd.kvstore.placement``), and the next poll leaves at once, so
a new epoch reaches the node within the gateway's own delay (Raft's commit). One poll is in flight at a
time. When a poll fails (no gateway answered, an error status, a body that does not make a ring) the next
one leaves after a backoff (0.25 s doubling to ``max_backoff``, with jitter); an answer that comes quickly
without a newer epoch (a gateway that does not wait) is followed by a pause of ``min_interval``, so the
watch never spins.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from chashd.client import AsyncKVStoreClient, ChashError, describe
from chashd.kvstore.placement import RingUpdate
from chashd.kvstore.registration import backoff_delay

__all__ = ["RingWatch"]


class RingWatch(Service):
    """Follows the ring of the gateways of ``client`` and hands each newer epoch to ``on_ring``.

    A subclass follows another long-polled document of the gateways with ``_ask``, ``_parse`` and ``_newer``
    (the gateways' own data planes follow their routing so: ``chashd.gateway.follow.RoutingWatch``).
    """

    _log = Logger()
    #: What the log lines call this watch.
    what = "ring watch"

    def __init__(
        self,
        client: AsyncKVStoreClient,
        clock: IReactorTime,
        on_ring: Callable[[Any], None],
        poll_timeout: float = 25.0,
        max_backoff: float = 10.0,
        min_interval: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._clock = clock
        self._on_ring = on_ring
        self.poll_timeout = poll_timeout
        self.max_backoff = max_backoff
        self.min_interval = min_interval
        self._rng = rng or random.Random()
        self._failures = 0
        self._call: IDelayedCall | None = None
        self._inflight: Deferred[Any] | None = None
        self._started = 0.0
        #: The newest ring learned, None before the first.
        self.latest: Any = None  # a RingUpdate here, what _parse returns in a subclass

    def startService(self) -> None:
        super().startService()
        self._schedule(0)

    def stopService(self) -> None:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._inflight is not None:
            self._inflight.cancel()

    def _schedule(self, delay: float) -> None:
        self._call = self._clock.callLater(delay, self._poll)

    def _ask(self, latest: Any) -> Deferred[dict[str, Any]]:
        """The next poll: the ring, or (once there is one) a long poll for a newer one."""
        if latest is None:
            return self._client.ring()
        return self._client.ring(after=latest.epoch, wait=self.poll_timeout)

    def _parse(self, body: dict[str, Any]) -> Any:
        """The update in an answer's JSON body; ``ValueError`` for one that is not."""
        return RingUpdate.from_json(body)

    def _newer(self, update: Any, latest: Any) -> bool:
        """Whether ``update`` is to be followed after ``latest``."""
        return bool(update.epoch > latest.epoch)

    def _poll(self) -> None:
        self._call = None
        self._started = self._clock.seconds()
        self._inflight = maybeDeferred(self._ask, self.latest).addCallback(self._parse)
        self._inflight.addCallbacks(self._answered, self._failed)

    def _answered(self, update: Any) -> None:
        self._inflight = None
        if self._failures:
            self._log.info("{what}: {gateway} answers again", what=self.what, gateway=self._client.preferred_url)
        self._failures = 0
        newer = self.latest is None or self._newer(update, self.latest)
        if newer:
            self.latest = update
            try:
                self._on_ring(update)
            except Exception:
                self._log.failure("{what}: handling epoch {epoch} failed", what=self.what, epoch=update.epoch)
        quick = self._clock.seconds() - self._started < self.min_interval
        self._schedule(0 if newer or not quick else self.min_interval)

    def _failed(self, failure: Failure) -> None:
        self._inflight = None
        if not self.running:
            return  # cancelled by stopService
        self._failures += 1
        delay = backoff_delay(self._failures, 0.25, self.max_backoff, self._rng)
        if failure.check(ChashError, ValueError):  # no gateway answered, an error status, not a ring
            self._log.warn(
                "{what}: cannot poll the gateways ({error}); trying again in {delay:.2f}s",
                what=self.what,
                error=describe(failure.value),
                delay=delay,
            )
        else:
            self._log.failure(
                "{what}: the poll failed; trying again in {delay:.2f}s", failure, what=self.what, delay=delay
            )
        self._schedule(delay)
