"""The kvstore's ring watch, long-polling a real RingAPI (real Membership, in-memory Raft) through the cluster
client over StubTreq."""

from __future__ import annotations

import json
import random
from typing import Any

from treq.testing import StubTreq
from twisted.logger import capturedLogs
from twisted.web.resource import Resource

from chashd.client import AsyncKVStoreClient
from chashd.kvstore.placement import RingUpdate
from chashd.kvstore.ringwatch import RingWatch
from tests.unit.memory_network import HTTPNetwork
from tests.unit.test_ring_api import BASE, RingAPITestsBase


class _Fixed(Resource):
    """A server that answers every request at once with ``body``, whatever was asked."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render(self, request: Any) -> bytes:
        return self.body


class RingWatchTests(RingAPITestsBase):
    """RingWatch against the gateway's /ring routes (replicas 2); ``gateway`` is the real one, any other
    host refuses unless a test adds it to ``self.network``."""

    def setUp(self) -> None:
        super().setUp()
        self.updates: list[RingUpdate] = []
        self.network = HTTPNetwork({"gateway": self.stub})
        self.watches: list[RingWatch] = []

    def tearDown(self) -> None:
        for watch in self.watches:
            watch.stopService()
        super().tearDown()

    def watch(self, gateways: list[str] | None = None, **kw: Any) -> RingWatch:
        client = AsyncKVStoreClient(self.network, gateways or [BASE], reactor=self.clock)
        watch = RingWatch(client, self.clock, kw.pop("on_ring", self.updates.append), rng=random.Random(0), **kw)
        watch.startService()
        self.watches.append(watch)
        self.clock.advance(0)
        self.network.flush()
        return watch

    def test_learns_each_new_epoch_at_once(self) -> None:
        """The first poll gets the current ring; the next one waits at the gateway and returns as soon as
        the map changes, with no time passing on the kvstore's side."""
        self.register(node_id="kv-a")
        watch = self.watch()
        first = self.membership.view.epoch
        assert [u.epoch for u in self.updates] == [first]
        assert self.network.urls[-1] == f"{BASE}/ring?after={first}&timeout=25"
        self.register(node_id="kv-b", port=8081)
        self.network.flush()
        assert [u.epoch for u in self.updates] == [first, first + 1]
        update = self.updates[-1]
        assert update.ring == self.membership.view.ring
        assert update.nodes["kv-b"].line_port == 11212 and update.nodes["kv-b"].host == "127.0.0.1"
        assert watch.latest == update

    def test_replicas_follow_the_ring_size(self) -> None:
        """The ring body carries N (the gateway's --replicas, 2 here) capped at the number of nodes."""
        self.register(node_id="kv-a")
        self.watch()
        assert self.updates[-1].replicas == 1
        for i, name in enumerate(("kv-b", "kv-c")):
            self.register(node_id=name, port=8081 + i)
            self.network.flush()
        assert self.updates[-1].replicas == 2

    def test_leaving_nodes_are_listed(self) -> None:
        """A draining node leaves the ring but keeps its address in ``leaving``."""
        self.register(node_id="kv-a")
        self.register(node_id="kv-b", port=8081)
        self.watch()
        self.request("POST", "/ring/nodes/kv-b/drain")
        self.network.flush()
        update = self.updates[-1]
        assert "kv-b" not in update.ring and "kv-b" in update.leaving and "kv-b" not in update.nodes

    def test_a_gateway_that_refuses_is_passed_over(self) -> None:
        """A gateway that refuses is followed by the next one in the same poll; the one that answered is
        asked first from then on."""
        self.register()
        self.watch(gateways=["http://down:8000", BASE])
        assert [u.epoch for u in self.updates] == [self.membership.view.epoch]
        assert self.network.asked == ["down:8000", "gateway", "gateway"]  # the ring, then the long poll

    def test_backoff_grows_and_is_bounded(self) -> None:
        """While no gateway answers, each poll asks every gateway and the delays double up to max_backoff,
        jittered: never a tight loop. The first answer ends the backoff."""
        with capturedLogs() as events:
            self.watch(gateways=["http://down:8000", "http://down:8001"], max_backoff=2.0)
        assert any("cannot poll" in e.get("log_format", "") and "down:8001" in e["error"] for e in events)
        delays = []
        for _ in range(6):
            (call,) = self.clock.getDelayedCalls()
            delays.append(call.getTime() - self.clock.seconds())
            self.clock.advance(delays[-1])
        assert 0.18 <= delays[0] <= 0.32 and delays[0] < delays[1] < delays[2] < delays[3]
        assert all(d <= 2.0 * 1.25 for d in delays) and delays[-1] >= 2.0 * 0.75
        assert self.network.asked == ["down:8000", "down:8001"] * 7
        self.network.hosts["down:8001"] = self.stub
        (call,) = self.clock.getDelayedCalls()
        self.clock.advance(call.getTime() - self.clock.seconds())
        self.network.flush()
        assert [u.epoch for u in self.updates] == [self.membership.view.epoch]

    def test_a_gateway_that_does_not_wait_is_not_hammered(self) -> None:
        """An answer that comes at once without a newer epoch is followed by a pause of min_interval."""
        body = json.dumps({"epoch": 3, "nodes": [], "replicas": 1}).encode()
        self.network.hosts["eager"] = StubTreq(_Fixed(body))
        watch = self.watch(gateways=["http://eager"], min_interval=1.0)
        assert len(self.network.urls) == 2  # the first ring, then at once a long poll (answered at once)
        for _ in range(10):
            self.clock.advance(1.0)
            self.network.flush()
        assert len(self.network.urls) == 12 and [u.epoch for u in self.updates] == [3]
        watch.stopService()
        assert self.clock.getDelayedCalls() == []

    def test_a_bad_body_is_a_failure(self) -> None:
        """A 200 whose body is not a ring counts as a failed poll (backoff)."""
        self.network.hosts["proxy"] = StubTreq(_Fixed(b"<html>proxy error</html>"))
        with capturedLogs() as events:
            self.watch(gateways=["http://proxy"])
        assert self.updates == [] and any("cannot poll" in e.get("log_format", "") for e in events)
        (call,) = self.clock.getDelayedCalls()
        assert call.getTime() - self.clock.seconds() >= 0.18

    def test_a_failing_handler_does_not_stop_the_watch(self) -> None:
        """An exception in on_ring is logged; the next epoch still comes."""
        self.register()
        seen: list[int] = []

        def handler(update: RingUpdate) -> None:
            seen.append(update.epoch)
            raise RuntimeError("boom")

        with capturedLogs() as events:
            self.watch(on_ring=handler)
            self.register(node_id="kv-b", port=8081)
            self.network.flush()
        assert len(seen) == 2 and any(e.get("log_failure") for e in events)
        assert len(self.flushLoggedErrors(RuntimeError)) == 2

    def test_stop_cancels_the_waiting_poll(self) -> None:
        """Stopping while a long poll waits at the gateway cancels it: no timer left on either side."""
        self.register()
        watch = self.watch()
        assert self.clock.getDelayedCalls()  # the gateway's wait and the request's timeout
        watch.stopService()
        self.network.flush()
        assert self.clock.getDelayedCalls() == []
