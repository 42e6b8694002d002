"""Registration of a kvstore with the gateways.

The node announces itself (``POST /ring/nodes`` with its id, address, ports, weight and a sequence
number, through the cluster client's ``register``) at start and again every ``interval`` seconds, so that a
gateway that lost it (or a new leader) learns it back. Announcements are idempotent: the gateway ignores one
that changes nothing. While no gateway takes it (none answers, or one refuses), the node keeps serving
direct traffic and tries again after a backoff (``backoff_delay``: 0.5 s doubling to ``max_backoff``, with
jitter); each try asks every gateway in turn, starting with the one that answered last.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from chashd.client import AsyncKVStoreClient, ChashError, describe

__all__ = ["Registrar", "backoff_delay"]


class Registrar(Service):
    """Keeps this node registered with the gateways of ``client``; ``announcement()`` returns what to send.

    ``registered_with`` is the URL of the gateway that took the last announcement, None while none did.
    """

    _log = Logger()
    max_backoff = 30.0

    def __init__(
        self,
        client: AsyncKVStoreClient,
        announcement: Callable[[], dict[str, Any]],
        clock: IReactorTime,
        interval: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._announcement = announcement
        self._clock = clock
        self._interval = interval
        self._rng = rng or random.Random()
        self._failures = 0
        self._call: IDelayedCall | None = None
        self._inflight: Deferred[Any] | None = None
        self.registered_with: str | None = None

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
        self._call = self._clock.callLater(delay, self._attempt)

    def _attempt(self) -> None:
        self._call = None
        self._inflight = maybeDeferred(lambda: self._client.register(self._announcement()))
        self._inflight.addCallbacks(self._registered, self._failed)

    def _registered(self, answer: dict[str, Any]) -> None:
        self._inflight = None
        gateway = self._client.preferred_url
        if self.registered_with != gateway or self._failures:
            self._log.info("registered with {gateway} (epoch {epoch})", gateway=gateway, epoch=answer.get("epoch"))
        self.registered_with = gateway
        self._failures = 0
        self._schedule(self._interval)

    def _failed(self, failure: Failure) -> None:
        self._inflight = None
        if failure.check(CancelledError) and not self.running:
            return
        self.registered_with = None
        self._failures += 1
        delay = backoff_delay(self._failures, 0.5, self.max_backoff, self._rng)
        if failure.check(ChashError):
            self._log.warn(
                "cannot register with the gateways ({error}); retrying in {delay:.1f}s",
                error=describe(failure.value),
                delay=delay,
            )
        else:
            self._log.failure("cannot register with the gateways; retrying in {delay:.1f}s", failure, delay=delay)
        self._schedule(delay)


def backoff_delay(failures: int, first: float, cap: float, rng: random.Random) -> float:
    """The wait after ``failures`` failures in a row: ``first`` doubling up to ``cap``, +-25% jitter so that
    many nodes restarted together do not retry in step."""
    return min(cap, first * 2.0 ** min(failures - 1, 16)) * (0.75 + rng.random() / 2)
