"""Registration with the gateways (chashd.kvstore.registration): announcements through the cluster client to
a real RingAPI (real Membership, in-memory Raft) over StubTreq, repeated every interval, retried with
backoff."""

from __future__ import annotations

import random
from typing import Any

from treq.testing import StubTreq
from twisted.logger import LogLevel, capturedLogs
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from chashd.client import AsyncKVStoreClient
from chashd.kvstore.registration import Registrar
from tests.unit.memory_network import HTTPNetwork
from tests.unit.test_ring_api import BASE, RingAPITestsBase, announcement


class _Silent(Resource):
    """A gateway that never answers."""

    isLeaf = True

    def render(self, request: Any) -> Any:
        return NOT_DONE_YET


class RegistrarTests(RingAPITestsBase):
    """The Registrar service against the gateway's ``POST /ring/nodes``."""

    options = {"token": "s3cret"}

    def setUp(self) -> None:
        super().setUp()
        self.network = HTTPNetwork({"gateway": self.stub})
        self.seq = 5
        self.registrars: list[Registrar] = []

    def tearDown(self) -> None:
        for registrar in self.registrars:
            registrar.stopService()
        self.network.flush()
        super().tearDown()

    def registrar(self, gateways: list[str] | None = None, token: str | None = "s3cret") -> Registrar:
        client = AsyncKVStoreClient(self.network, gateways or [BASE], token=token, reactor=self.clock)
        registrar = Registrar(
            client, lambda: announcement("kv-a", seq=self.seq), self.clock, interval=30, rng=random.Random(1)
        )
        registrar.startService()
        self.registrars.append(registrar)
        self.clock.advance(0)
        self.network.flush()
        return registrar

    def posts(self) -> int:
        """The announcements sent so far."""
        return sum(1 for url in self.network.urls if url.endswith("/ring/nodes"))

    def delays(self, registrar: Registrar, count: int) -> list[float]:
        """Let ``count`` retries happen; their delays."""
        delays = []
        for _ in range(count):
            (call,) = self.clock.getDelayedCalls()
            delays.append(call.getTime() - self.clock.seconds())
            self.clock.advance(delays[-1])
            self.network.flush()
        return delays

    def test_registers_at_start_and_periodically(self) -> None:
        """The first announcement goes out at once and puts the node in the map, then one every interval."""
        registrar = self.registrar()
        assert self.posts() == 1 and registrar.registered_with == BASE
        node = self.membership.view.node("kv-a")
        assert node is not None and node.seq == 5 and "kv-a" in self.membership.view.ring
        self.clock.advance(29)
        self.network.flush()
        assert self.posts() == 1
        self.seq = 6
        self.clock.advance(1)
        self.network.flush()
        assert self.posts() == 2
        node = self.membership.view.node("kv-a")
        assert node is not None and node.seq == 6

    def test_retries_with_backoff_until_a_gateway_answers(self) -> None:
        """While no gateway answers, each try asks every gateway, and the delays grow; the first success
        resets them and the next announcement comes an interval later."""
        with capturedLogs() as events:
            registrar = self.registrar(["http://down:1", "http://down:2"])
            delays = self.delays(registrar, 3)
            self.network.hosts["down:2"] = self.stub
            delays += self.delays(registrar, 1)
        assert registrar.registered_with == "http://down:2"
        assert self.network.asked == ["down:1", "down:2"] * 4 + ["down:1", "down:2"]
        assert delays == sorted(delays) and delays[-1] > delays[0]
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        assert len(warnings) == 4 and "connection refused" in warnings[0]["error"]
        (call,) = self.clock.getDelayedCalls()
        assert call.getTime() - self.clock.seconds() == 30

    def test_a_refusal_is_retried_with_its_detail_logged(self) -> None:
        """A gateway that refuses the announcement (another node holds the id) is asked again later."""
        self.register(node_id="kv-a", host="127.0.0.9", headers={"Authorization": "Bearer s3cret"})
        with capturedLogs() as events:
            registrar = self.registrar()
        assert registrar.registered_with is None
        (warning,) = [e for e in events if e["log_level"] == LogLevel.warn]
        assert "taken" in warning["error"]
        assert len(self.clock.getDelayedCalls()) == 1

    def test_backoff_is_capped(self) -> None:
        """A gateway that never answers is retried at most every max_backoff seconds (with jitter)."""
        registrar = self.registrar(["http://down:1"])
        assert all(delay <= Registrar.max_backoff * 1.25 for delay in self.delays(registrar, 25))

    def test_sends_the_token(self) -> None:
        """The announcement carries the cluster's token; without it the gateway refuses (401)."""
        registrar = self.registrar(token=None)
        assert registrar.registered_with is None and self.membership.view.node("kv-a") is None
        assert self.registrar().registered_with == BASE

    def test_stop_cancels_the_request_in_flight(self) -> None:
        """Stopping cancels the pending request and leaves no timer."""
        self.network.hosts["silent"] = StubTreq(_Silent())
        registrar = self.registrar(["http://silent"])
        assert len(self.clock.getDelayedCalls()) == 1  # the request's timeout
        registrar.stopService()
        self.network.flush()
        assert self.clock.getDelayedCalls() == []
