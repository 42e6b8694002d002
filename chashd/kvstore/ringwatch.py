"""The kvstore's watch of the ring: a long poll of ``GET /ring`` on the gateways.

The node asks one gateway ``GET {gateway}/ring?after=<the last epoch it knows>&timeout=25``; the gateway
answers at once when its epoch is newer, else when the next epoch comes (or after 25 s, with the same
ring). Each answer with a newer epoch goes to ``on_ring`` as a ``RingUpdate`` (``chashd.kvstore.placement``),
and the next poll leaves at once, so a new epoch reaches the node within the gateway's own delay (Raft's
commit). One poll is in flight at a time. When a gateway fails (refused, timeout, a non-200 answer, a body
that does not parse) the next one of the list is asked after a backoff (0.25 s doubling to ``max_backoff``,
with jitter); an answer that comes quickly without a newer epoch (a gateway that does not wait) is followed
by a pause of ``min_interval``, so the watch never spins.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from chashd.kvstore.placement import RingUpdate
from chashd.kvstore.registration import backoff_delay

__all__ = ["RingWatch", "treq_get"]


#: ``get(url, timeout)`` fires with ``(HTTP status, body)``.
Getter = Callable[[str, float], Deferred[tuple[int, bytes]]]


class RingWatch(Service):
    """Follows the ring of the gateways ``gateways`` (base URLs) and hands each newer epoch to ``on_ring``.

    A subclass follows another long-polled document of the gateways with ``_url``, ``_parse`` and ``_newer``
    (the gateways' own data planes follow their routing so: ``chashd.gateway.follow.RoutingWatch``).
    """

    _log = Logger()
    #: What the log lines call this watch.
    what = "ring watch"

    def __init__(
        self,
        gateways: Sequence[str],
        get: Getter,
        clock: IReactorTime,
        on_ring: Callable[[RingUpdate], None],
        poll_timeout: float = 25.0,
        max_backoff: float = 10.0,
        min_interval: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        if not gateways:
            raise ValueError("a ring watch needs at least one gateway")
        self._gateways = [g.rstrip("/") for g in gateways]
        self._get = get
        self._clock = clock
        self._on_ring = on_ring
        self.poll_timeout = poll_timeout
        self.max_backoff = max_backoff
        self.min_interval = min_interval
        self._rng = rng or random.Random()
        self._next = 0
        self._failures = 0
        self._call: IDelayedCall | None = None
        self._inflight: Deferred[tuple[int, bytes]] | None = None
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
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = self._clock.callLater(delay, self._poll)

    def _parse(self, body: Any) -> Any:
        """The update in an answer's JSON body; ``ValueError`` for one that is not."""
        return RingUpdate.from_json(body)

    def _newer(self, update: Any, latest: Any) -> bool:
        """Whether ``update`` is to be followed after ``latest``."""
        return bool(update.epoch > latest.epoch)

    def _url(self) -> str:
        base = self._gateways[self._next % len(self._gateways)] + "/ring"
        if self.latest is None:
            return base
        return f"{base}?after={self.latest.epoch}&timeout={self.poll_timeout:g}"

    @inlineCallbacks
    def _poll(self) -> Any:
        self._call = None
        url = self._url()
        started = self._clock.seconds()
        update: RingUpdate | None = None
        error = ""
        try:
            self._inflight = self._get(url, self.poll_timeout + 10.0)
            code, body = yield self._inflight
            if code != 200:
                error = f"HTTP {code}"
            else:
                update = self._parse(json.loads(body))
        except Exception as e:  # network errors, timeouts, a bad body, cancellation on stop
            error = f"{type(e).__name__}: {e}"
        finally:
            self._inflight = None
        if not self.running:
            return
        if update is None:
            self._failed(url, error)
            return
        if self._failures:
            self._log.info("{what}: {url} answers again", what=self.what, url=url)
        self._failures = 0
        newer = self.latest is None or self._newer(update, self.latest)
        if newer:
            self.latest = update
            try:
                self._on_ring(update)
            except Exception:
                self._log.failure("{what}: handling epoch {epoch} failed", what=self.what, epoch=update.epoch)
        quick = self._clock.seconds() - started < self.min_interval
        self._schedule(0 if newer or not quick else self.min_interval)

    def _failed(self, url: str, error: str) -> None:
        self._failures += 1
        self._next += 1
        delay = backoff_delay(self._failures, 0.25, self.max_backoff, self._rng)
        self._log.warn(
            "{what}: cannot poll {url} ({error}); trying the next gateway in {delay:.2f}s",
            what=self.what,
            url=url,
            error=error,
            delay=delay,
        )
        self._schedule(delay)


def treq_get(client: Any, clock: IReactorTime | None = None, token: str | None = None) -> Getter:
    """A ``get`` for ``RingWatch`` over a ``treq.client.HTTPClient`` (its timeout runs on ``clock``), sending
    ``Authorization: Bearer <token>`` when there is a token."""
    headers = {b"Authorization": [b"Bearer " + token.encode()]} if token else None

    @inlineCallbacks
    def get(url: str, timeout: float) -> Any:
        response = yield client.get(url, timeout=timeout, reactor=clock, headers=headers)
        content = yield response.content()
        return response.code, content

    return get
