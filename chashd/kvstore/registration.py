"""Registration of a kvstore with the gateways.

The node announces itself (``POST /ring/nodes`` with its id, address, ports, weight and a sequence
number) to one of the gateways it was given, and again every ``interval`` seconds, so that a gateway
that lost it (or a new leader) learns it back. Announcements are idempotent: the gateway ignores one
that changes nothing. While no gateway answers, the node keeps serving direct traffic and retries with
exponential backoff, trying the next gateway each time.
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

__all__ = ["Registrar", "backoff_delay"]


class Registrar(Service):
    """Keeps this node registered with the gateways.

    ``announcement()`` returns the body to send; ``post(url, body, headers)`` sends it and fires with
    the HTTP status code (the production one is treq-based, tests pass their own).
    """

    _log = Logger()
    max_backoff = 30.0

    def __init__(
        self,
        gateways: Sequence[str],
        announcement: Callable[[], dict[str, Any]],
        post: Callable[[str, bytes, dict[bytes, list[bytes]]], Deferred[tuple[int, bytes]]],
        clock: IReactorTime,
        interval: float = 30.0,
        token: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._gateways = list(gateways)
        self._announcement = announcement
        self._post = post
        self._clock = clock
        self._interval = interval
        self._token = token
        self._rng = rng or random.Random()
        self._next = 0
        self._failures = 0
        self._call: IDelayedCall | None = None
        self._inflight: Deferred[Any] | None = None
        self.registered_with: str | None = None

    def startService(self) -> None:
        super().startService()
        if self._gateways:
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
        self._call = self._clock.callLater(delay, self._attempt)

    @inlineCallbacks
    def _attempt(self) -> Any:
        self._call = None
        url = self._gateways[self._next % len(self._gateways)].rstrip("/") + "/ring/nodes"
        headers = {b"Content-Type": [b"application/json"]}
        if self._token:
            headers[b"Authorization"] = [b"Bearer " + self._token.encode()]
        body = json.dumps(self._announcement()).encode()
        try:
            self._inflight = self._post(url, body, headers)
            code, answer = yield self._inflight
        except Exception as e:  # network errors, timeouts, cancellation on stop
            error = f"{type(e).__name__}: {e}"
            code, answer = 0, b""
        else:
            error = ""
        finally:
            self._inflight = None
        if not self.running:
            return
        if 200 <= code < 300:
            if self.registered_with != url or self._failures:
                self._log.info("registered with {gateway}", gateway=url)
            self.registered_with = url
            self._failures = 0
            self._schedule(self._interval)
            return
        if not error:
            error = f"HTTP {code}: {_detail(answer)}"
        self.registered_with = None
        self._failures += 1
        self._next += 1
        delay = backoff_delay(self._failures, 0.5, self.max_backoff, self._rng)
        self._log.warn(
            "cannot register with {gateway} ({error}); retrying in {delay:.1f}s",
            gateway=url,
            error=error,
            delay=delay,
        )
        self._schedule(delay)


def backoff_delay(failures: int, first: float, cap: float, rng: random.Random) -> float:
    """The wait after ``failures`` failures in a row: ``first`` doubling up to ``cap``, +-25% jitter so that
    many nodes restarted together do not retry in step."""
    return min(cap, first * 2 ** min(failures - 1, 16)) * (0.75 + rng.random() / 2)


def _detail(body: bytes) -> str:
    try:
        parsed = json.loads(body)
        return str(parsed.get("detail") or parsed)[:200]
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace")


def treq_post(
    client: Any, timeout: float = 5.0
) -> Callable[[str, bytes, dict[bytes, list[bytes]]], Deferred[tuple[int, bytes]]]:
    """A ``post`` for ``Registrar`` over a ``treq.client.HTTPClient``."""

    @inlineCallbacks
    def post(url: str, body: bytes, headers: dict[bytes, list[bytes]]) -> Any:
        response = yield client.post(url, data=body, headers=headers, timeout=timeout)
        content = yield response.content()
        return response.code, content

    return post
