"""The /ring routes, through StubTreq over the real resource, a real Membership and the real state machine
(applied in memory by LocalRaft)."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from chashd.config import GatewayConfig, load_config
from chashd.gateway.api import RingAPI, RingRoot
from chashd.gateway.membership import Membership
from chashd.gateway.raft import RaftListener, RaftSettings
from chashd.gateway.testing import LocalRaft
from chashd.ring import HashRing, key_hash
from chashd.web import KeyValueHTTP

BASE = "http://gateway"


class ClockWithThreads(Clock):
    """A Clock whose ``callFromThread`` runs at once (LocalRaft reports on the caller's thread)."""

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        f(*args, **kw)


def announcement(node_id: str = "kv-a", **kw: Any) -> dict[str, Any]:
    """A kvstore's registration body, as chashd/kvstore/registration.py sends it."""
    return {"id": node_id, "host": "127.0.0.1", "port": 8080, "line_port": 11212, "weight": 100, "seq": 1} | kw


class RingAPITestsBase(SynchronousTestCase):
    """A gateway's ring API over a LocalRaft membership."""

    options: dict[str, Any] = {}

    def setUp(self) -> None:
        self.clock = ClockWithThreads()
        self.config = load_config(GatewayConfig, {"gateway_id": "g1", "replicas": "2", **self.options}, environ={})
        self.rafts: list[LocalRaft] = []
        self.membership = Membership(self.config, self.clock, self._factory)
        self.membership.startService()
        self.clock.advance(0.5)
        self.extra: dict[str, Any] = {"rebalancing": False, "handoff": {"pending": 0}}
        self.api = RingAPI(self.membership, self.config, self.clock, status_extra=lambda: self.extra)
        self.stub: Any = StubTreq(self.api.resource())

    def _factory(self, settings: RaftSettings, listener: RaftListener) -> LocalRaft:
        raft = LocalRaft(settings, listener)
        self.rafts.append(raft)
        return raft

    def tearDown(self) -> None:
        self.api.close()
        self.membership.stopService()
        self.stub.flush()
        assert self.clock.getDelayedCalls() == []

    def request(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any], Any]:
        """Send a request and return (status, headers as a dict of first values, parsed JSON body)."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        d = self.stub.request(method, BASE + path, data=data, headers=headers or {})
        self.stub.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(self.stub.content(response))
        heads = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
        return response.code, heads, json.loads(content) if content else None

    def register(self, **kw: Any) -> tuple[int, dict[str, Any], Any]:
        """POST /ring/nodes."""
        headers = kw.pop("headers", None)
        return self.request("POST", "/ring/nodes", announcement(**kw), headers=headers)


class RingReadTests(RingAPITestsBase):
    """GET /ring, /ring/status, /ring/lookup, /ring/nodes."""

    def test_ring_json(self) -> None:
        """/ring is HashRing.to_dict() plus each node's address and state; a client rebuilds the same ring."""
        self.register(node_id="kv-a", weight=100)
        self.register(node_id="kv-b", port=8081, weight=200)
        code, headers, body = self.request("GET", "/ring")
        assert code == 200 and headers["content-type"] == "application/json"
        view = self.membership.view
        assert body["epoch"] == view.epoch and headers["x-chash-epoch"] == str(view.epoch)
        assert HashRing.from_dict(body) == view.ring
        assert body["nodes"][1] == {
            "id": "kv-b",
            "weight": 200,
            "host": "127.0.0.1",
            "port": 8081,
            "line_port": 11212,
            "state": "up",
        }
        assert body["gateways"][0]["id"] == "g1" and body["leaving"] == []

    def test_status(self) -> None:
        """/ring/status has the fields of the issue, and status_extra() merged in."""
        self.register()
        code, _, body = self.request("GET", "/ring/status")
        assert code == 200
        assert body["gateway_id"] == "g1" and body["leader"] == "g1" and body["is_leader"] is True
        assert (body["replicas"], body["write_quorum"], body["read_quorum"]) == (2, 2, 2)
        assert body["epoch"] == self.membership.view.epoch
        assert body["nodes"] == [
            dict(id="kv-a", host="127.0.0.1", port=8080, line_port=11212, weight=100, state="up", seq=1)
        ]
        assert body["rebalancing"] is False and body["handoff"] == {"pending": 0}

    def test_status_without_leader(self) -> None:
        """With no leader known, leader is null."""
        self.rafts[0].elect(None)
        _, _, body = self.request("GET", "/ring/status")
        assert body["leader"] is None and body["has_quorum"] is False
        assert body["last_leader"] is None and body["leader_raft"] is None and body["map_current"] is False

    def test_status_of_cut_off_follower(self) -> None:
        """A gateway that Raft still tells the leader of, but that has not heard from it within the election
        timeout (a follower cut off from the other gateways), names no leader: leader and leader_raft are
        null, map_current false, and last_leader names the one it last knew; once a leader is heard from
        again, leader names it."""
        address = self.rafts[0].settings.self_address
        _, _, body = self.request("GET", "/ring/status")
        assert (body["leader"], body["leader_raft"], body["last_leader"]) == ("g1", address, "g1")
        assert body["map_current"] is True
        self.rafts[0].lose_contact()
        _, _, body = self.request("GET", "/ring/status")
        assert body["map_current"] is False and body["is_leader"] is False
        assert (body["leader"], body["leader_raft"], body["last_leader"]) == (None, None, "g1")
        assert self.membership.leader_id() is None and self.membership.last_leader_id() == "g1"
        self.rafts[0].elect(address)
        _, _, body = self.request("GET", "/ring/status")
        assert (body["leader"], body["map_current"]) == ("g1", True)

    def test_lookup(self) -> None:
        """/ring/lookup/{key} is the key's preference list of N (capped at the node count), primary first."""
        for i, name in enumerate(("kv-a", "kv-b", "kv-c")):
            self.register(node_id=name, port=8080 + i)
        code, _, body = self.request("GET", "/ring/lookup/user%3A42")
        assert code == 200
        expected = self.membership.view.ring.preference_list(b"user:42", 2)
        assert [n["id"] for n in body["nodes"]] == list(expected)
        assert body["key"] == "user:42" and body["replicas"] == 2
        assert {n["port"] for n in body["nodes"]} <= {8080, 8081, 8082}

    def test_lookup_takes_the_key_as_sent(self) -> None:
        """/ring/lookup/{key} names the key /kv/{key} names: a leading slash, a doubled or trailing one and a
        dot segment are kept (werkzeug's path converter redirected /ring/lookup/%2Fa to another key)."""
        self.register()
        for path, key in (("%2Fa", "/a"), ("a%2F%2Fb", "a//b"), ("a%2F", "a/"), ("%2E%2E", "..")):
            code, _, body = self.request("GET", "/ring/lookup/" + path)
            assert code == 200 and body["key"] == key and body["hash"] == key_hash(key.encode()), (path, body)
        code, _, body = self.request("GET", "/ring/lookup/")
        assert code == 400 and "key is empty" in body["detail"]

    def test_lookup_caps_at_node_count(self) -> None:
        """With one node, the list holds one node; with none, it is empty."""
        _, _, body = self.request("GET", "/ring/lookup/k")
        assert body["nodes"] == [] and body["replicas"] == 1
        self.register()
        _, _, body = self.request("GET", "/ring/lookup/k")
        assert [n["id"] for n in body["nodes"]] == ["kv-a"]

    def test_lookup_bad_keys(self) -> None:
        """Keys are checked like memcached keys: too long, or with a space, is a 400 problem."""
        for path in ("/ring/lookup/" + "k" * 251, "/ring/lookup/a%20b", "/ring/lookup/a%01"):
            code, headers, body = self.request("GET", path)
            assert code == 400, path
            assert headers["content-type"] == "application/problem+json" and body["status"] == 400

    def test_nodes(self) -> None:
        """/ring/nodes lists the nodes; /ring/nodes/{id} one, or 404."""
        self.register()
        code, _, body = self.request("GET", "/ring/nodes")
        assert code == 200 and [n["id"] for n in body["nodes"]] == ["kv-a"]
        code, _, body = self.request("GET", "/ring/nodes/kv-a")
        assert code == 200 and body["node"]["port"] == 8080
        code, headers, body = self.request("GET", "/ring/nodes/nope")
        assert code == 404 and headers["content-type"] == "application/problem+json"

    def test_routing_errors_are_problems(self) -> None:
        """Unknown paths and methods get problem+json (404, 405 with Allow)."""
        code, headers, body = self.request("GET", "/ring/nothing/here")
        assert code == 404 and body["status"] == 404
        code, headers, body = self.request("PUT", "/ring/status")
        assert code == 405 and "GET" in headers["allow"]


class RingLongPollTests(RingAPITestsBase):
    """GET /ring?after=<epoch>&timeout=<s>."""

    def test_answers_at_once_when_newer(self) -> None:
        """An epoch newer than `after` is answered at once."""
        epoch = self.membership.view.epoch
        code, _, body = self.request("GET", f"/ring?after={epoch - 1}&timeout=30")
        assert code == 200 and body["epoch"] == epoch

    def test_waits_for_the_next_epoch(self) -> None:
        """The answer comes when the epoch passes `after`."""
        epoch = self.membership.view.epoch
        d = self.stub.get(f"{BASE}/ring?after={epoch}&timeout=30")
        self.stub.flush()
        self.assertNoResult(d)
        self.register()
        self.stub.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(self.stub.json_content(response))
        assert body["epoch"] == epoch + 1 and body["nodes"][0]["id"] == "kv-a"

    def test_timeout(self) -> None:
        """Without a change, the current ring comes back after the timeout."""
        epoch = self.membership.view.epoch
        d = self.stub.get(f"{BASE}/ring?after={epoch}&timeout=2.5")
        self.stub.flush()
        self.clock.advance(2.4)
        self.stub.flush()
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.stub.flush()
        body = self.successResultOf(self.stub.json_content(self.successResultOf(d)))
        assert body["epoch"] == epoch

    def test_timeout_is_capped(self) -> None:
        """A huge timeout is cut to max_wait."""
        d = self.stub.get(f"{BASE}/ring?after={self.membership.view.epoch}&timeout=100000")
        self.stub.flush()
        self.clock.advance(self.api.max_wait)
        self.stub.flush()
        assert self.successResultOf(d).code == 200

    def test_waiters_are_capped(self) -> None:
        """Over max_waiters, a long poll gets a 503 with Retry-After instead of waiting."""
        self.api.max_waiters = 2
        epoch = self.membership.view.epoch
        waiting = [self.stub.get(f"{BASE}/ring?after={epoch}") for _ in range(2)]
        self.stub.flush()
        code, headers, body = self.request("GET", f"/ring?after={epoch}")
        assert code == 503 and headers["retry-after"] == "1"
        self.register()
        self.stub.flush()
        assert all(self.successResultOf(d).code == 200 for d in waiting)

    def test_bad_query(self) -> None:
        """A non-numeric or negative `after`/`timeout` is a 400."""
        for query in ("after=x", "after=-1", "after=1&timeout=nan", "after=1&timeout=-2"):
            code, _, _ = self.request("GET", f"/ring?{query}")
            assert code == 400, query

    def test_cancelled_waiter_is_forgotten(self) -> None:
        """A waiter whose Deferred is cancelled (the client went away) leaves no timer."""
        d = self.api._wait(self.membership.view.epoch, 30)
        assert len(self.api._waiters) == 1
        d.cancel()
        self.failureResultOf(d)
        assert self.api._waiters == []
        assert [c for c in self.clock.getDelayedCalls() if getattr(c, "func", None) == self.api._expire] == []


class RingAdminTests(RingAPITestsBase):
    """POST /ring/nodes, drain, DELETE."""

    def test_register_then_again(self) -> None:
        """The first registration is a 201 and bumps the epoch; the same again is a 200 'unchanged'."""
        epoch = self.membership.view.epoch
        code, headers, body = self.register()
        assert code == 201 and body["result"] == "registered" and body["epoch"] == epoch + 1
        assert body["node"]["state"] == "up"
        code, _, body = self.register()
        assert code == 200 and body["result"] == "unchanged" and body["epoch"] == epoch + 1
        assert self.membership.view.epoch == epoch + 1

    def test_newer_seq_updates(self) -> None:
        """A higher seq with a new weight is a 200 'updated'."""
        self.register()
        code, _, body = self.register(seq=2, weight=50)
        assert code == 200 and body["result"] == "updated" and body["node"]["weight"] == 50

    def test_duplicate_id_other_address(self) -> None:
        """The same id from another address while it is up: 409 problem+json naming the first address."""
        self.register()
        code, headers, body = self.register(host="127.0.0.2", seq=2)
        assert code == 409 and headers["content-type"] == "application/problem+json"
        assert "127.0.0.1:8080" in body["detail"]

    def test_stale_seq(self) -> None:
        """An older seq with other data: 409."""
        self.register(seq=5)
        code, _, body = self.register(seq=4, weight=7)
        assert code == 409 and "seq 4" in body["detail"]

    def test_bad_input(self) -> None:
        """Weight 0 or negative, bad ports, bad ids, malformed JSON, non-objects: 400 problem+json."""
        bodies = [
            announcement(weight=0),
            announcement(weight=-3),
            announcement(weight="5"),
            announcement(port=0),
            announcement(line_port=70000),
            announcement(seq=-1),
            announcement(node_id="has space"),
            announcement(host="bad host"),
            {k: v for k, v in announcement().items() if k != "port"},
        ]
        for body in bodies:
            code, headers, problem = self.request("POST", "/ring/nodes", body)
            assert code == 400, body
            assert headers["content-type"] == "application/problem+json" and problem["detail"]
        for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
            code, _, problem = self.request("POST", "/ring/nodes", raw=raw)
            assert code == 400, raw
        assert self.membership.view.nodes == ()

    def test_body_cap(self) -> None:
        """A body over the cap is a 413, whether announced by Content-Length or not."""
        big = json.dumps(announcement(pad="x" * (self.api.max_body + 10))).encode()
        code, _, problem = self.request("POST", "/ring/nodes", raw=big)
        assert code == 413 and problem["status"] == 413

    def test_defaults(self) -> None:
        """weight defaults to 100 and seq to 0 for a hand-written registration."""
        body = {"id": "kv-z", "host": "h", "port": 1, "line_port": 2}
        code, _, answer = self.request("POST", "/ring/nodes", body)
        assert code == 201 and answer["node"]["weight"] == 100 and answer["node"]["seq"] == 0

    def test_drain(self) -> None:
        """Drain: the node turns leaving, leaves the ring, shows in /ring's leaving list; unknown is 404."""
        self.register()
        code, _, body = self.request("POST", "/ring/nodes/kv-a/drain")
        assert code == 200 and body["result"] == "updated" and body["node"]["state"] == "leaving"
        _, _, ring = self.request("GET", "/ring")
        assert ring["nodes"] == [] and ring["leaving"][0]["id"] == "kv-a"
        code, _, body = self.request("POST", "/ring/nodes/kv-a/drain")
        assert code == 200 and body["result"] == "unchanged"
        code, _, body = self.request("POST", "/ring/nodes/nope/drain")
        assert code == 404 and "nope" in body["detail"]

    def test_remove(self) -> None:
        """DELETE removes the node; again (or unknown) is a 404."""
        self.register()
        code, _, body = self.request("DELETE", "/ring/nodes/kv-a")
        assert code == 200 and body["result"] == "removed" and body["node"] is None
        assert self.membership.view.node("kv-a") is None
        code, _, _ = self.request("DELETE", "/ring/nodes/kv-a")
        assert code == 404

    def test_unconfirmed_change_is_503(self) -> None:
        """A change Raft could not confirm in time: 503 problem+json with Retry-After."""
        self.rafts[0].hold()
        d = self.stub.post(BASE + "/ring/nodes", data=json.dumps(announcement()).encode())
        self.stub.flush()
        self.clock.advance(self.membership.command_timeout)
        self.stub.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(self.stub.json_content(response))
        assert response.code == 503 and response.headers.getRawHeaders("Retry-After") == ["1"]
        assert "safe to retry" in body["detail"]

    def test_change_without_leader_is_503_at_once(self) -> None:
        """A gateway that knows no leader (cut off from the majority: the leader stepped down, the followers
        lost it) refuses a change at once, not after the command timeout: 503 problem+json saying why."""
        self.rafts[0].elect(None)
        d = self.stub.post(BASE + "/ring/nodes", data=json.dumps(announcement()).encode())
        self.stub.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(self.stub.json_content(response))
        assert response.code == 503 and response.headers.getRawHeaders("Retry-After") == ["1"]
        assert "no Raft leader is known" in body["detail"] and "majority" in body["detail"]
        assert all(op != "register_node" for op, _ in self.rafts[0].submitted)
        _, _, status = self.request("GET", "/ring/status")
        assert status["leader"] is None and status["is_leader"] is False

    def test_change_at_cut_off_follower_is_503_at_once(self) -> None:
        """A gateway that names a leader it has not heard from within the election timeout (a follower cut off
        from the other gateways) refuses register, drain and remove at once, without advancing the clock to
        the command timeout: 503 problem+json with Retry-After saying why, nothing submitted to Raft. Once a
        leader is heard from, a drain runs."""
        self.register()
        self.rafts[0].lose_contact()
        submitted = len(self.rafts[0].submitted)
        for method, path, body in (
            ("POST", "/ring/nodes", announcement("kv-b")),
            ("POST", "/ring/nodes/kv-a/drain", None),
            ("DELETE", "/ring/nodes/kv-a", None),
        ):
            code, headers, problem = self.request(method, path, body)
            assert code == 503 and headers["retry-after"] == "1", (path, code)
            assert headers["content-type"] == "application/problem+json"
            assert "no Raft leader heard from within the election timeout" in problem["detail"]
            assert "nothing was applied" in problem["detail"]
        assert len(self.rafts[0].submitted) == submitted
        self.rafts[0].elect(self.rafts[0].settings.self_address)
        code, _, body = self.request("POST", "/ring/nodes/kv-a/drain")
        assert code == 200 and body["node"]["state"] == "leaving"


class RingTokenTests(RingAPITestsBase):
    """With --token, register, drain and remove need the bearer token."""

    options = {"token": "s3cret"}

    def test_missing_token(self) -> None:
        """No Authorization header: 401 with WWW-Authenticate; nothing registered."""
        code, headers, body = self.register()
        assert code == 401 and headers["www-authenticate"].startswith("Bearer")
        assert body["status"] == 401 and self.membership.view.nodes == ()

    def test_wrong_token(self) -> None:
        """Another token: 403."""
        code, _, _ = self.register(headers={"Authorization": "Bearer nope"})
        assert code == 403
        code, _, _ = self.register(headers={"Authorization": "Basic czNjcmV0"})
        assert code == 401

    def test_right_token(self) -> None:
        """The right token: registered; drain and remove need it too; reads do not."""
        auth = {"Authorization": "Bearer s3cret"}
        code, _, _ = self.register(headers=auth)
        assert code == 201
        assert self.request("POST", "/ring/nodes/kv-a/drain")[0] == 401
        assert self.request("DELETE", "/ring/nodes/kv-a")[0] == 401
        assert self.request("GET", "/ring")[0] == 200
        assert self.request("POST", "/ring/nodes/kv-a/drain", headers=auth)[0] == 200
        assert self.request("DELETE", "/ring/nodes/kv-a", headers=auth)[0] == 200


class RingRootTests(RingAPITestsBase):
    """RingRoot sends /ring and below to the ring API, everything else to the shared surface."""

    def test_dispatch(self) -> None:
        """/ring/status comes from the ring API, /health and /kv from KeyValueHTTP."""
        http = KeyValueHTTP(health=lambda: {"role": "gateway"})
        self.stub = StubTreq(RingRoot(self.api.resource(), http.resource()))
        code, _, body = self.request("GET", "/ring/status")
        assert code == 200 and body["gateway_id"] == "g1"
        code, _, body = self.request("GET", "/health")
        assert code == 200 and body["role"] == "gateway"
        code, _, body = self.request("GET", "/kv/x")
        assert code == 503  # no backend yet: the router comes with the data plane
        code, _, body = self.request("GET", "/ringside")
        assert code == 404

    def test_path_not_utf8(self) -> None:
        """A /ring path that is not UTF-8 once percent-decoded is a 400 problem+json naming the rule (Klein
        alone answers it in plain text), as a /kv path is."""
        http = KeyValueHTTP(health=lambda: {"role": "gateway"})
        self.stub = StubTreq(RingRoot(self.api.resource(), http.resource()))
        for path, rule in (("/ring/lookup/%FF", "the URL path is not UTF-8"), ("/kv/%FF", "not UTF-8 once")):
            code, headers, body = self.request("GET", path)
            assert code == 400 and headers["content-type"] == "application/problem+json", path
            assert rule in body["detail"], (path, body)
