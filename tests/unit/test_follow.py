"""The routing feed (GET /ring/placement on the real RingAPI, through StubTreq) and the routing watch that
follows it, with a Clock."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs

from chashd.client import AsyncKVStoreClient
from chashd.gateway.dataplane import Routing
from chashd.gateway.follow import RoutingFeed, RoutingWatch
from chashd.gateway.router import Placement
from chashd.node import NodeInfo, NodeState
from chashd.ring import HashRing
from tests.unit.memory_network import HTTPNetwork
from tests.unit.test_ring_api import BASE, RingAPITestsBase

TOKEN = "feed-token-for-tests"


def routing(epoch: int, nodes: tuple[str, ...] = ("kv-a", "kv-b"), previous: int | None = None) -> Routing:
    """A routing over ``nodes`` at ``epoch``; with ``previous``, a move from the ring of that epoch."""
    ring = HashRing(dict.fromkeys(nodes, 100), epoch=epoch)
    old = HashRing(dict.fromkeys(nodes[:1], 100), epoch=previous) if previous is not None else None
    states = {n: NodeState.UP for n in nodes}
    addresses = tuple(NodeInfo(n, "127.0.0.1", 8000 + i, 11000 + i, 100) for i, n in enumerate(nodes))
    return Routing(Placement(ring, states, old), addresses)


class FeedTestsBase(RingAPITestsBase):
    """A RingAPI with a routing feed that needs ``TOKEN``."""

    def setUp(self) -> None:
        super().setUp()
        self.api.close()
        self.feed = RoutingFeed(self.clock, TOKEN)
        from chashd.gateway.api import RingAPI

        self.api = RingAPI(self.membership, self.config, self.clock, routing=self.feed)
        self.stub = StubTreq(self.api.resource())

    def tearDown(self) -> None:
        self.feed.wake()
        super().tearDown()

    def placement(self, query: str = "", token: str | None = TOKEN) -> Deferred[Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.stub.get(f"{BASE}/ring/placement{query}", headers=headers)  # type: ignore[no-any-return]

    def body(self, d: Deferred[Any]) -> tuple[int, Any]:
        self.stub.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(self.stub.content(response))
        return response.code, json.loads(content)


class RoutingFeedTests(FeedTestsBase):
    """GET /ring/placement."""

    def test_answers_the_routing(self) -> None:
        """The body is the routing's JSON form; it reads back as the same routing."""
        self.feed.publish(routing(3, previous=2))
        code, body = self.body(self.placement())
        assert code == 200 and body["tag"] == "3.2"
        assert Routing.from_json(body) == routing(3, previous=2)

    def test_needs_the_token(self) -> None:
        """Without the token the answer is a 401, with another one a 403: the routing tells where kvstores listen."""
        self.feed.publish(routing(3))
        assert self.body(self.placement(token=None))[0] == 401
        assert self.body(self.placement(token="another"))[0] == 403

    def test_no_routing_yet(self) -> None:
        """Before the gateway routes, a 503."""
        assert self.body(self.placement())[0] == 503

    def test_waits_for_another_tag(self) -> None:
        """With the current tag as ``known`` the answer waits; publishing the same tag does not end the wait,
        a move that ends (same epoch, no previous ring) does."""
        self.feed.publish(routing(3, previous=2))
        d = self.placement("?known=3.2&timeout=20")
        self.stub.flush()
        self.assertNoResult(d)
        self.feed.publish(routing(3, previous=2))
        self.stub.flush()
        self.assertNoResult(d)
        self.feed.publish(routing(3))
        code, body = self.body(d)
        assert code == 200 and body["tag"] == "3.0"

    def test_timeout_answers_the_same(self) -> None:
        """A wait that times out answers the current routing."""
        self.feed.publish(routing(4))
        d = self.placement("?known=4.0&timeout=2")
        self.stub.flush()
        self.clock.advance(2)
        assert self.body(d) == (200, routing(4).to_json())

    def test_waiters_are_capped(self) -> None:
        """Past ``max_waiters`` a poll gets a 503 at once."""
        self.feed.max_waiters = 1
        self.feed.publish(routing(4))
        first = self.placement("?known=4.0")
        self.stub.flush()
        self.assertNoResult(first)
        assert self.body(self.placement("?known=4.0"))[0] == 503


class RoutingWatchTests(FeedTestsBase):
    """RoutingWatch against the feed."""

    def setUp(self) -> None:
        super().setUp()
        self.routings: list[Routing] = []
        self.network = HTTPNetwork({"gateway": self.stub})
        self.watches: list[RoutingWatch] = []

    def tearDown(self) -> None:
        for watch in self.watches:
            watch.stopService()
        super().tearDown()

    def watch(self, gateways: list[str] | None = None, token: str = TOKEN) -> RoutingWatch:
        """A watch of the gateway (BASE) through the cluster client; any other host refuses connections."""
        client = AsyncKVStoreClient(self.network, gateways or [BASE], token=token, reactor=self.clock)
        watch = RoutingWatch(client, self.clock, self.routings.append, rng=random.Random(0))
        watch.startService()
        self.watches.append(watch)
        self.clock.advance(0)
        self.network.flush()
        return watch

    def test_follows_each_change_at_once(self) -> None:
        """The first poll gets the routing; the next waits with its tag and returns at the next change."""
        self.feed.publish(routing(5, previous=4))
        self.watch()
        assert [r.tag for r in self.routings] == ["5.4"]
        assert self.network.urls[-1] == f"{BASE}/ring/placement?known=5.4&timeout=25"
        self.feed.publish(routing(5))
        self.stub.flush()
        self.clock.advance(0)
        self.stub.flush()
        assert [r.tag for r in self.routings] == ["5.4", "5.0"]

    def test_skips_an_older_epoch(self) -> None:
        """A gateway answering an older epoch (its Raft log lags) is not followed back."""
        self.feed.publish(routing(6))
        watch = self.watch()
        self.feed.publish(routing(5))
        self.stub.flush()
        self.clock.advance(1)
        self.stub.flush()
        assert [r.tag for r in self.routings] == ["6.0"] and watch.latest == routing(6)

    def test_next_gateway_after_a_failure(self) -> None:
        """A gateway that refuses is passed over for the next one in the same poll."""
        self.feed.publish(routing(2))
        self.watch(["http://down:1", BASE])
        assert [r.tag for r in self.routings] == ["2.0"]
        assert self.network.asked[:2] == ["down:1", "gateway"]

    def test_backoff_and_the_token(self) -> None:
        """A watch without the right token is refused (403) and tries again after a backoff, with a warning."""
        self.feed.publish(routing(2))
        with capturedLogs() as events:
            self.watch(token="another")
        assert self.routings == [] and len(self.clock.getDelayedCalls()) == 1
        errors = [e["error"] for e in events if "cannot poll" in e.get("log_format", "")]
        assert "HTTP 403: the token is not this cluster's" in errors


class RoutingFormTests(RingAPITestsBase):
    """Routing's JSON form."""

    def test_round_trip_and_tag(self) -> None:
        """A routing reads back equal, its node states included; the tag names the epoch and the previous one."""
        r = routing(9, ("a", "b", "c"), previous=7)
        again = Routing.from_json(json.loads(json.dumps(r.to_json())))
        assert again == r and again.tag == "9.7" and again.placement.states["b"] == NodeState.UP

    def test_current_flag(self) -> None:
        """A routing whose map may be stale reads back so, with a tag of its own (a follower waiting on the
        current one hears of it); a body without the flag (an earlier gateway's) counts as current."""
        stale = replace(routing(9), current=False)
        again = Routing.from_json(json.loads(json.dumps(stale.to_json())))
        assert again == stale and not again.current and again.tag == "9.0.stale"
        earlier = routing(9).to_json()
        del earlier["current"]
        assert Routing.from_json(earlier).current

    def test_malformed(self) -> None:
        """Another version, a missing ring, a bad node or a current flag that is not a boolean are ValueErrors."""
        good = routing(1).to_json()
        bad: object
        for bad in (
            {**good, "version": 2}, {**good, "ring": None}, {**good, "nodes": [{"id": "x"}]}, {**good, "current": 1},
            [], None,
        ):  # fmt: skip
            with self.assertRaises(ValueError):
                Routing.from_json(bad)
