"""Registration with the gateways: idempotent announcements, retries with backoff."""

from __future__ import annotations

import json
import random
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from chashd.kvstore.registration import Registrar


class FakeGateways:
    """Records posts; answers from a script of results (a status code or an exception)."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.posts: list[tuple[str, dict[str, Any], dict[bytes, list[bytes]]]] = []

    def post(self, url: str, body: bytes, headers: dict[bytes, list[bytes]]) -> Deferred[tuple[int, bytes]]:
        self.posts.append((url, json.loads(body), headers))
        answer = self.answers.pop(0) if self.answers else 200
        if isinstance(answer, Exception):
            return fail(answer)
        if isinstance(answer, Deferred):
            return answer
        return succeed((answer, b'{"detail": "nope"}'))


def _registrar(gateways: FakeGateways, clock: Clock, **kw: Any) -> Registrar:
    return Registrar(
        ["http://g1:8000", "http://g2:8000/"],
        lambda: {"id": "a", "host": "h", "port": 1, "line_port": 2, "weight": 1, "seq": 5},
        gateways.post,
        clock,
        interval=30,
        rng=random.Random(1),
        **kw,
    )


class RegistrarTests:
    """The Registrar service."""

    def test_registers_at_start_and_periodically(self) -> None:
        """The first announcement goes out at once, then every interval."""
        clock, gateways = Clock(), FakeGateways()
        registrar = _registrar(gateways, clock)
        registrar.startService()
        clock.advance(0)
        assert [p[0] for p in gateways.posts] == ["http://g1:8000/ring/nodes"]
        assert gateways.posts[0][1]["id"] == "a"
        assert registrar.registered_with == "http://g1:8000/ring/nodes"
        clock.advance(29)
        assert len(gateways.posts) == 1
        clock.advance(1)
        assert len(gateways.posts) == 2
        registrar.stopService()
        assert clock.getDelayedCalls() == []

    def test_retries_next_gateway_with_backoff(self) -> None:
        """Failures rotate through the gateways with growing delays, and a success resets them."""
        clock = Clock()
        refused = ConnectionRefusedError()
        gateways = FakeGateways(refused, 503, refused, refused, 200)
        registrar = _registrar(gateways, clock)
        with capturedLogs() as events:
            registrar.startService()
            clock.advance(0)
            delays = []
            while registrar.registered_with is None:
                (call,) = clock.getDelayedCalls()
                delays.append(call.getTime() - clock.seconds())
                clock.advance(delays[-1])
        urls = [p[0] for p in gateways.posts]
        assert urls == ["http://g1:8000/ring/nodes", "http://g2:8000/ring/nodes"] * 2 + ["http://g1:8000/ring/nodes"]
        assert delays == sorted(delays) and delays[-1] > delays[0]
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        assert len(warnings) == 4
        assert "HTTP 503: nope" in warnings[1]["error"]
        (call,) = clock.getDelayedCalls()
        assert call.getTime() - clock.seconds() == 30
        registrar.stopService()

    def test_backoff_is_capped(self) -> None:
        """A gateway that never answers is retried at most every max_backoff seconds (with jitter)."""
        clock = Clock()
        gateways = FakeGateways(*[ConnectionRefusedError()] * 30)
        registrar = _registrar(gateways, clock)
        registrar.startService()
        clock.advance(0)
        for _ in range(25):
            (call,) = clock.getDelayedCalls()
            delay = call.getTime() - clock.seconds()
            assert delay <= Registrar.max_backoff * 1.25
            clock.advance(delay)
        registrar.stopService()

    def test_sends_token(self) -> None:
        """With a token, the announcement carries it as a bearer token."""
        clock, gateways = Clock(), FakeGateways()
        registrar = _registrar(gateways, clock, token="s3cret")
        registrar.startService()
        clock.advance(0)
        assert gateways.posts[0][2][b"Authorization"] == [b"Bearer s3cret"]
        registrar.stopService()

    def test_stop_cancels_request_in_flight(self) -> None:
        """Stopping cancels the pending request and leaves no timer."""
        clock = Clock()
        pending: Deferred[tuple[int, bytes]] = Deferred()
        gateways = FakeGateways(pending)
        registrar = _registrar(gateways, clock)
        registrar.startService()
        clock.advance(0)
        registrar.stopService()
        assert pending.called
        assert clock.getDelayedCalls() == []

    def test_no_gateways_no_timer(self) -> None:
        """A node with no gateways given runs standalone."""
        clock = Clock()
        registrar = Registrar([], dict, FakeGateways().post, clock)
        registrar.startService()
        assert clock.getDelayedCalls() == []
