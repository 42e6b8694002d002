"""chashd.client: URL handling, error mapping, and the async client through StubTreq over the real resources
(the gateway's ring API over a LocalRaft membership, the shared /kv surface over a real LocalBackend)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from chashd.client import (
    AsyncKVStoreClient,
    ChashError,
    Item,
    NotFound,
    PreconditionFailed,
    Rejected,
    ServerError,
    Unauthorized,
    Unreachable,
    gateway_urls,
    http_client,
)
from chashd.client._api import Response, error_for
from chashd.config import GatewayConfig, load_config
from chashd.gateway.api import RingAPI, RingRoot
from chashd.gateway.membership import Membership
from chashd.gateway.raft import RaftListener, RaftSettings
from chashd.gateway.testing import LocalRaft
from chashd.kvstore.backend import LocalBackend
from chashd.ring import HashRing
from chashd.storage.memory import MemoryEngine
from chashd.web import KeyValueHTTP
from tests.unit.memory_network import HTTPNetwork


class GatewayURLTests:
    """Which gateways a client talks to."""

    def test_default(self) -> None:
        """Without URLs or $CHASH_GATEWAY, the default gateway on loopback port 8000."""
        assert gateway_urls(None, environ={}) == ["http://127.0.0.1:8000"]

    def test_environment(self) -> None:
        """$CHASH_GATEWAY is a comma-separated list; host:port becomes an http URL."""
        env = {"CHASH_GATEWAY": "h1:8000, https://h2:8443/ ,h1:8000"}
        assert gateway_urls(None, environ=env) == ["http://h1:8000", "https://h2:8443"]

    def test_given_wins(self) -> None:
        """URLs given explicitly win over the environment; each item may itself be a list."""
        env = {"CHASH_GATEWAY": "other:1"}
        assert gateway_urls(["a:1,b:2", "c:3"], environ=env) == ["http://a:1", "http://b:2", "http://c:3"]

    def test_bad(self) -> None:
        """A URL of another scheme, a bad port or an empty list is a ValueError naming it."""
        for bad in ("ftp://h:1", "http://h:99999", " , "):
            with pytest.raises(ValueError):
                gateway_urls(bad)


class ErrorMappingTests:
    """HTTP answers to the ChashError family."""

    def _response(self, status: int, body: Any) -> Response:
        raw = json.dumps(body).encode() if not isinstance(body, bytes) else body
        return Response("http://g/kv/k", status, {}, raw)

    def test_problem_detail(self) -> None:
        """The problem+json detail is the message; the status picks the class."""
        problem = {"title": "Not Found", "detail": "no node 'x' in the ring", "status": 404}
        error = error_for(self._response(404, problem))
        assert isinstance(error, NotFound)
        assert str(error) == "no node 'x' in the ring"
        assert (error.status, error.title, error.url) == (404, "Not Found", "http://g/kv/k")

    def test_classes(self) -> None:
        """401/403 Unauthorized, 412 PreconditionFailed, other 4xx Rejected, 5xx ServerError."""
        kinds = {401: Unauthorized, 403: Unauthorized, 412: PreconditionFailed, 400: Rejected, 413: Rejected}
        for status, kind in kinds.items():
            assert type(error_for(self._response(status, {"detail": "d"}))) is kind
        assert type(error_for(self._response(500, {"detail": "d"}))) is ServerError
        assert issubclass(Unreachable, ChashError) and issubclass(NotFound, Rejected)

    def test_not_json(self) -> None:
        """A body that is not problem+json (a proxy's page) still gives a one-line message with the status."""
        error = error_for(self._response(502, b"<html>Bad Gateway</html>"))
        assert isinstance(error, ServerError)
        assert str(error) == "HTTP 502: <html>Bad Gateway</html>"


class ClockWithThreads(Clock):
    """A Clock whose ``callFromThread`` runs at once (LocalRaft reports on the caller's thread)."""

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        f(*args, **kw)


class AsyncClientTests(SynchronousTestCase):
    """AsyncKVStoreClient against a gateway-shaped resource: /ring routes and /kv over a real backend."""

    token: str | None = None

    def setUp(self) -> None:
        self.clock = ClockWithThreads()
        options = {"gateway_id": "g1", "replicas": "2"}
        if self.token:
            options["token"] = self.token
        self.config = load_config(GatewayConfig, options, environ={})
        self.membership = Membership(self.config, self.clock, self._raft)
        self.membership.startService()
        self.clock.advance(0.5)
        for name in ("kv-a", "kv-b", "kv-c"):
            self.membership.register_node(name, "127.0.0.1", 8080, 11212, 100, 1)
        self.clock.advance(0.5)
        self.api = RingAPI(self.membership, self.config, self.clock, status_extra=lambda: {"rebalancing": False})
        self.backend = LocalBackend(MemoryEngine(), "kv-a", self.clock, 1024)
        surface = KeyValueHTTP(self.backend, role="gateway")
        self.network = HTTPNetwork(
            {
                "gw": StubTreq(RingRoot(self.api.resource(), surface.resource())),
                # A server whose /kv answers 503, as a gateway without quorum does.
                "busy": StubTreq(KeyValueHTTP(None, role="gateway").resource()),
            }
        )

    def _raft(self, settings: RaftSettings, listener: RaftListener) -> LocalRaft:
        return LocalRaft(settings, listener)

    def tearDown(self) -> None:
        self.api.close()
        self.membership.stopService()
        self.network.flush()
        self.backend.stop()

    def client(self, *hosts: str, **kw: Any) -> AsyncKVStoreClient:
        urls = [f"http://{h}" for h in hosts or ("gw",)]
        return AsyncKVStoreClient(self.network, urls, reactor=self.clock, **kw)

    def result(self, d: Deferred[Any]) -> Any:
        self.network.flush()
        return self.successResultOf(d)

    def failure(self, d: Deferred[Any], *kinds: type[Exception]) -> Any:
        self.network.flush()
        return self.failureResultOf(d, *kinds).value

    def test_put_get_delete(self) -> None:
        """A value stored with flags and a TTL reads back with them and its version; delete says whether it hit."""
        client = self.client()
        assert self.result(client.put("greeting", "héllo", ttl=100, flags=7)) is None
        item = self.result(client.get_item("greeting"))
        assert isinstance(item, Item)
        assert (item.key, item.value, item.flags) == ("greeting", "héllo".encode(), 7)
        assert item.cas > 0 and item.expires_at > 0
        assert self.result(client.get("greeting")) == "héllo".encode()
        assert self.result(client.delete("greeting")) is True
        assert self.result(client.get("greeting")) is None
        assert self.result(client.delete("greeting")) is False

    def test_keys_are_escaped(self) -> None:
        """Keys with '/', '%', '?' and non-ASCII letters reach the server as themselves."""
        client = self.client()
        for key in ("a/b", "100%", "why?", "clé#1"):
            self.result(client.put(key, key.encode()))
            assert self.result(client.get(key)) == key.encode()
        assert self.backend.stats()["curr_items"] == 4

    def test_conditional_writes(self) -> None:
        """cas= writes only over that version, only_if_absent only when missing; else PreconditionFailed."""
        client = self.client()
        self.result(client.put("k", b"1", only_if_absent=True))
        self.failure(client.put("k", b"2", only_if_absent=True), PreconditionFailed)
        cas = self.result(client.get_item("k")).cas
        self.result(client.put("k", b"3", cas=cas))
        error = self.failure(client.put("k", b"4", cas=cas), PreconditionFailed)
        assert error.status == 412 and "changed" in str(error)
        assert self.result(client.get("k")) == b"3"

    def test_bad_key_fails_the_deferred(self) -> None:
        """A key memcached would refuse fails the Deferred with Rejected before anything is sent."""
        error = self.failure(self.client().put("a b", b"x"), Rejected)
        assert "space" in str(error)
        assert self.network.asked == []

    def test_ring_lookup_status_nodes(self) -> None:
        """ring, hash_ring, lookup, status and nodes return what the gateway's routes say."""
        client = self.client()
        ring = self.result(client.ring())
        assert {n["id"] for n in ring["nodes"]} == {"kv-a", "kv-b", "kv-c"}
        hash_ring = self.result(client.hash_ring())
        assert isinstance(hash_ring, HashRing)
        found = self.result(client.lookup("user:1"))
        assert [n["id"] for n in found["nodes"]] == list(hash_ring.preference_list("user:1", 2))
        status = self.result(client.status())
        assert status["gateway_id"] == "g1" and status["rebalancing"] is False
        assert [n["id"] for n in self.result(client.nodes())] == ["kv-a", "kv-b", "kv-c"]
        assert self.result(client.node("kv-b"))["id"] == "kv-b"
        assert self.result(client.health())["status"] == "ok"

    def test_long_poll(self) -> None:
        """ring(after=epoch) waits for the next epoch and answers with it."""
        client = self.client()
        epoch = self.result(client.ring())["epoch"]
        d = client.ring(after=epoch, wait=10)
        self.network.flush()
        self.assertNoResult(d)
        self.membership.register_node("kv-d", "127.0.0.1", 8081, 11213, 100, 1)
        self.clock.advance(0.1)
        ring = self.result(d)
        assert ring["epoch"] > epoch and "kv-d" in {n["id"] for n in ring["nodes"]}

    def test_drain_remove_unknown(self) -> None:
        """drain and remove change the map; an unknown node is NotFound with the server's detail."""
        client = self.client()
        assert self.result(client.drain("kv-c"))["node"]["state"] == "leaving"
        self.result(client.remove("kv-c"))
        error = self.failure(client.node("kv-c"), NotFound)
        assert "kv-c" in str(error) and error.status == 404
        self.failure(client.drain("nobody"), NotFound)

    def test_failover(self) -> None:
        """A refused connection and a 503 move the request on to the next gateway, which is then tried first."""
        client = self.client("down", "busy", "gw")
        self.result(client.put("k", b"v"))
        assert self.network.asked == ["down", "busy", "gw"]
        assert self.result(client.get("k")) == b"v"
        assert self.network.asked[3:] == ["gw"]

    def test_all_unavailable(self) -> None:
        """When every gateway answers 503 or refuses, the 503's detail is the error (ServerError)."""
        error = self.failure(self.client("down", "busy").put("k", b"v"), ServerError)
        assert error.status == 503 and "no key-value backend" in str(error)

    def test_unreachable(self) -> None:
        """When no gateway can be reached, Unreachable names each one and why."""
        error = self.failure(self.client("down", "gone").get("k"), Unreachable)
        assert set(error.errors) == {"http://down", "http://gone"}
        assert "connection refused" in str(error)

    def test_register(self) -> None:
        """register announces a node (201 the first time, 200 with a newer seq) and it joins the ring."""
        client = self.client(token=self.token)
        announcement = {"id": "kv-d", "host": "127.0.0.1", "port": 8083, "line_port": 11215, "weight": 100, "seq": 1}
        answer = self.result(client.register(announcement))
        assert answer["result"] == "registered" and answer["node"]["line_port"] == 11215
        self.clock.advance(0.1)
        assert "kv-d" in self.membership.view.ring
        again = self.result(client.register({**announcement, "weight": 50, "seq": 2}))
        assert again["result"] == "updated" and again["epoch"] > answer["epoch"]

    def test_cancel_stops_the_request_and_the_failover(self) -> None:
        """Cancelling a call cancels the request under way, asks no other server and leaves no timer."""
        self.network.hosts["slow"] = StubTreq(_Silent())
        d = self.client("slow", "gw").put("k", b"v")
        self.network.flush()
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.network.flush()
        assert self.network.asked == ["slow"]
        assert self.clock.getDelayedCalls() == []

    def test_preferred_url(self) -> None:
        """The server that answered last is asked first next time."""
        client = self.client("down", "gw")
        assert client.preferred_url == "http://down"
        self.result(client.health())
        assert client.preferred_url == "http://gw"

    def test_a_url_treq_cannot_send_fails_the_deferred(self) -> None:
        """treq raises at once for an IPv6 literal (hyperlink's issue #188): the call fails with
        Unreachable, it does not raise."""
        client = AsyncKVStoreClient(http_client(MemoryReactorClock()), ["http://[::1]:8000"], reactor=self.clock)
        error = self.failure(client.health(), Unreachable)
        assert "[::1]" in str(error)

    def test_timeout(self) -> None:
        """A gateway that does not answer within the timeout counts as unreachable: the next one is asked."""
        self.network.hosts["slow"] = StubTreq(_Silent())
        client = self.client("slow", "gw", timeout=2)
        d = client.put("k", b"v")
        self.network.flush()
        self.assertNoResult(d)
        self.clock.advance(2.5)
        assert self.result(d) is None
        assert self.network.asked == ["slow", "gw"]
        missed = self.client("slow", timeout=2).get("k")
        self.network.flush()
        self.clock.advance(2.5)
        assert "timed out" in str(self.failure(missed, Unreachable))


class _Silent(Resource):
    """A resource that never answers."""

    isLeaf = True

    def render(self, request: Any) -> Any:
        return NOT_DONE_YET


@implementer(IPolicyForHTTPS)
class _Policy:
    """An ``IPolicyForHTTPS`` that records the servers it is asked about (and makes no TLS)."""

    def __init__(self) -> None:
        self.asked: list[tuple[bytes, int]] = []

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        self.asked.append((hostname, port))
        return optionsForClientTLS(hostname.decode())


class HTTPClientTests(SynchronousTestCase):
    """http_client: the treq client the daemons make their requests with."""

    def test_tls_policy_decides_https(self) -> None:
        """An https request goes through the given TLS policy, on a persistent quiet pool."""
        reactor = MemoryReactorClock()
        policy = _Policy()
        client = AsyncKVStoreClient(reactor, ["https://gateway.example:8443"], tls=policy)
        client.health()
        assert policy.asked == [(b"gateway.example", 8443)]
        assert [port for _, port, *_ in reactor.tcpClients] == [8443]

    def test_tls_is_for_a_client_made_here(self) -> None:
        """A treq client brings its own TLS settings: passing both is refused."""
        with pytest.raises(ValueError, match="tls"):
            AsyncKVStoreClient(StubTreq(Resource()), ["https://g"], tls=_Policy())


class ImportTests:
    """What importing the client costs."""

    def test_blocking_client_imports_no_twisted(self) -> None:
        """``from chashd.client import KVStoreClient`` (the standard-library client) imports no Twisted;
        ``AsyncKVStoreClient`` is imported when asked for."""
        code = (
            "import sys\n"
            "from chashd.client import KVStoreClient, ChashError\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('twisted', 'treq')], 'twisted imported'\n"
            "from chashd.client import AsyncKVStoreClient\n"
            "assert 'treq' in sys.modules\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr


class AsyncClientTokenTests(AsyncClientTests):
    """With a token configured, admin calls need it."""

    token = "s3cret"

    def test_drain_remove_unknown(self) -> None:
        """drain with the right token works; without it Unauthorized (401), with another one 403."""
        assert self.result(self.client(token="s3cret").drain("kv-c"))["node"]["state"] == "leaving"
        error = self.failure(self.client().drain("kv-b"), Unauthorized)
        assert error.status == 401 and "Bearer" in str(error)
        assert self.failure(self.client(token="wrong").remove("kv-b"), Unauthorized).status == 403
