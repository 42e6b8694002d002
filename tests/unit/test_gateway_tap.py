"""The gateway's wiring: makeService with a memory reactor, an in-memory Raft and a fake probe."""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.application.service import IService, IServiceCollection
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from chashd.config import ConfigError
from chashd.daemon import SystemdNotifier
from chashd.gateway import tap
from chashd.gateway.membership import NO_LEADER
from chashd.gateway.raft import RaftListener, RaftSettings
from chashd.gateway.service import GatewayService
from chashd.gateway.testing import LocalRaft
from chashd.node import NodeInfo


class ThreadlessReactor(MemoryReactorClock):
    """A memory reactor whose ``callFromThread`` runs at once."""

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        f(*args, **kw)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LISTEN_PORT", "GATEWAY_ID", "RAFT_PORT", "PEER_GATEWAYS"):
        monkeypatch.delenv(name, raising=False)
    for name in list(__import__("os").environ):
        if name.startswith("CHASHD_"):
            monkeypatch.delenv(name, raising=False)


def _services(root: IService) -> list[IService]:
    found = [root]
    if IServiceCollection.providedBy(root):
        for child in root:
            found += _services(child)
    return found


class GatewayWiringTests(SynchronousTestCase):
    """makeService(options, reactor, raft_factory, probe)."""

    def setUp(self) -> None:
        self.reactor = ThreadlessReactor()
        self.rafts: list[LocalRaft] = []
        self.leader = True
        self.probed: list[str] = []

    def _factory(self, settings: RaftSettings, listener: RaftListener) -> LocalRaft:
        raft = LocalRaft(settings, listener, leader=self.leader)
        self.rafts.append(raft)
        return raft

    def _probe(self, node: NodeInfo) -> Deferred[Mapping[str, Any]]:
        self.probed.append(node.id)
        return succeed({"role": "kvstore", "id": node.id})

    def build(self, *args: str) -> IService:
        """Parse the options and build the gateway."""
        options = tap.Options()
        password = ["--raft-password", secrets.token_hex(16)]
        options.parseOptions(["--gateway-id", "g1", "--port", "tcp:18000:interface=127.0.0.1", *password, *args])
        return tap.makeService(options, reactor=self.reactor, raft_factory=self._factory, probe=self._probe)

    def stub(self) -> Any:
        """A StubTreq over the resource the HTTP listener serves."""
        factory: Any = self.reactor.tcpServers[0][1]
        return StubTreq(factory.resource)

    def get(self, stub: Any, path: str) -> tuple[int, Any]:
        """GET and parse."""
        response = self.successResultOf(stub.get("http://gateway" + path))
        return response.code, json.loads(self.successResultOf(stub.content(response)))

    def test_listens_and_builds_raft_in_start(self) -> None:
        """Nothing binds and no Raft object exists before startService; both after; stop leaves no timer."""
        service = self.build()
        assert self.reactor.tcpServers == [] and self.rafts == []
        service.startService()
        listening = sorted((p, iface) for p, _, _, iface in self.reactor.tcpServers)
        assert listening == [(11211, ""), (18000, "127.0.0.1")]
        assert len(self.rafts) == 1
        self.reactor.advance(1.0)
        service.stopService()
        assert self.reactor.getDelayedCalls() == []
        assert self.rafts[0].destroyed

    def test_routes(self) -> None:
        """The HTTP root serves /ring from the ring API and /health, /ready from the shared surface."""
        service = self.build()
        service.startService()
        stub = self.stub()
        code, body = self.get(stub, "/ring/status")
        assert code == 200 and body["gateway_id"] == "g1" and body["leader"] == "g1"
        code, body = self.get(stub, "/health")
        assert code == 200 and body["role"] == "gateway" and body["leader"] == "g1"
        service.stopService()

    def test_health_waits_until_this_gateway_is_in_the_map(self) -> None:
        """/health (and /ready) answer a 503 problem+json with Retry-After, naming why, while this gateway
        is not in the cluster map it serves: no leader known, then its registration held in Raft; 200 once
        the registration is applied, and systemd's READY=1 (the notifier's ready) only then. The 503 carries
        the fields a 200 has, and ``serving: false``."""
        self.leader = False
        service = self.build()
        notifier = next(s for s in _services(service) if isinstance(s, SystemdNotifier))
        service.startService()
        stub = self.stub()
        response = self.successResultOf(stub.get("http://gateway/health"))
        body = json.loads(self.successResultOf(stub.content(response)))
        assert response.code == 503 and response.headers.getRawHeaders("Retry-After") == ["1"]
        assert response.headers.getRawHeaders("Content-Type") == ["application/problem+json"]
        assert body["detail"].startswith("gateway g1 is not in the cluster map yet (it registers itself once it")
        assert body["detail"].endswith(f"): {NO_LEADER}")
        assert body["serving"] is False and body["role"] == "gateway" and body["id"] == "g1"
        assert body["epoch"] == 0 and body["leader"] is None and body["status"] == 503
        code, ready = self.get(stub, "/ready")
        assert code == 503 and ready["detail"] == body["detail"]
        raft = self.rafts[0]
        raft.hold()
        raft.elect("127.0.0.1:8002")  # another gateway leads; this one's registration waits in Raft
        assert raft.held and raft.held[0][0] == "register_gateway"
        code, body = self.get(stub, "/health")
        assert (
            code == 503 and body["detail"] == "gateway g1 is not in the cluster map yet: its registration is under way"
        )
        self.assertNoResult(notifier.ready)  # the Raft state is loaded, but this gateway is not in the map
        raft.release()
        code, body = self.get(stub, "/health")
        assert code == 200 and body["status"] == "ok" and body["epoch"] == 1, body
        self.successResultOf(notifier.ready)
        service.stopService()

    def test_health_of_a_lone_first_gateway(self) -> None:
        """A lone gateway (no peers) elects itself, registers itself, and is healthy without anything else."""
        service = self.build()
        service.startService()
        code, body = self.get(self.stub(), "/health")
        assert code == 200 and body["leader"] == "g1" and body["epoch"] == 1
        service.stopService()

    def test_ready_needs_leader_and_a_node_up(self) -> None:
        """/ready: 503 without a node up, 200 once one is registered, 503 again when it is down."""
        service = self.build()
        service.startService()
        stub = self.stub()
        code, body = self.get(stub, "/ready")
        assert code == 503 and "no kvstore" in body["detail"]
        gateway = next(s for s in _services(service) if isinstance(s, GatewayService))
        self.successResultOf(gateway.membership.register_node("kv-a", "h", 1, 2, 100, 1))
        code, body = self.get(stub, "/ready")
        assert code == 200 and body["ready"] is True
        self.successResultOf(gateway.membership.mark_down("kv-a"))
        assert self.get(stub, "/ready")[0] == 503
        service.stopService()

    def test_ready_without_leader(self) -> None:
        """No leader: /ready says so."""
        self.leader = False
        service = self.build()
        service.startService()
        code, body = self.get(self.stub(), "/ready")
        assert code == 503 and "leader" in body["detail"]
        service.stopService()

    def test_systemd_ready_waits_for_raft(self) -> None:
        """READY=1 (the notifier's ready) waits for the membership's ready, not only the listener."""
        self.leader = False
        service = self.build()
        notifier = next(s for s in _services(service) if isinstance(s, SystemdNotifier))
        service.startService()
        self.assertNoResult(notifier.ready)
        self.rafts[0].elect(self.rafts[0].settings.self_address)
        self.successResultOf(notifier.ready)
        service.stopService()

    def test_read_modify_writes_refused_without_leader_contact(self) -> None:
        """A gateway that names a leader but has not heard from it within the election timeout (cut off from
        the other gateways) routes no read-modify-write: the router is told, a DELETE answers a 503
        problem+json saying why; once the leader is heard from again, the router runs them again."""
        service = self.build()
        service.startService()
        gateway = next(s for s in _services(service) if isinstance(s, GatewayService))
        assert gateway.membership.map_current and gateway.router.map_current
        self.rafts[0].lose_contact()
        assert not gateway.membership.map_current and not gateway.router.map_current
        response = self.successResultOf(self.stub().delete("http://gateway/kv/k"))
        body = json.loads(self.successResultOf(response.content()))
        assert response.code == 503 and "Raft leader" in body["detail"]
        self.rafts[0].elect(self.rafts[0].settings.self_address)
        assert gateway.router.map_current
        service.stopService()

    def test_cut_off_follower_is_not_ready(self) -> None:
        """A gateway that still names a leader but has not heard from it within the election timeout (a
        follower cut off from the other gateways: pysyncobj holds no election then) answers /ready 503 saying
        why, and /ring/status says its map is not current and names no leader (only as last_leader), nor does
        /health; once it hears from the leader, both recover."""
        service = self.build()
        service.startService()
        stub = self.stub()
        gateway = next(s for s in _services(service) if isinstance(s, GatewayService))
        self.successResultOf(gateway.membership.register_node("kv-a", "h", 1, 2, 100, 1))
        assert self.get(stub, "/ready")[0] == 200 and self.get(stub, "/ring/status")[1]["map_current"] is True
        self.rafts[0].lose_contact()
        code, body = self.get(stub, "/ready")
        assert code == 503 and "heard from within the election timeout" in body["detail"]
        code, status = self.get(stub, "/ring/status")
        assert code == 200 and status["map_current"] is False
        assert status["leader"] is None and status["last_leader"] == "g1"
        assert self.get(stub, "/health")[1]["leader"] is None
        self.rafts[0].elect(self.rafts[0].settings.self_address)
        assert self.get(stub, "/ready")[0] == 200 and self.get(stub, "/ring/status")[1]["map_current"] is True
        service.stopService()

    def test_node_monitor_runs(self) -> None:
        """The node monitor asks the registered nodes with the injected probe."""
        service = self.build("--probe-interval", "0.5")
        service.startService()
        gateway = next(s for s in _services(service) if isinstance(s, GatewayService))
        self.successResultOf(gateway.membership.register_node("kv-a", "h", 1, 2, 100, 1))
        self.reactor.advance(0.5)
        assert self.probed == ["kv-a"]
        service.stopService()
        assert self.reactor.getDelayedCalls() == []

    def test_long_poll_answered_on_stop(self) -> None:
        """A waiting GET /ring?after= is answered when the gateway stops, leaving no timer."""
        service = self.build()
        service.startService()
        stub = self.stub()
        d = stub.get("http://gateway/ring?after=999&timeout=30")
        stub.flush()
        self.assertNoResult(d)
        service.stopService()
        stub.flush()
        assert self.successResultOf(d).code == 200
        assert self.reactor.getDelayedCalls() == []


class GatewayConfigCheckTests:
    """The secrets are checked before anything binds: a Raft password always, the token beyond loopback."""

    LOOPBACK = ("--gateway-id", "g1", "--port", "tcp:18000:interface=127.0.0.1")

    def test_refuses_without_raft_password(self) -> None:
        """On loopback too, a gateway without a Raft password stops with one line naming the option."""
        options = tap.Options()
        with pytest.raises(SystemExit) as raised:
            options.parseOptions([*self.LOOPBACK, "--peers", "127.0.0.1:8002"])
        message = str(raised.value.code)
        assert message.startswith("chash-gateway: error: option --raft-password is required")
        assert "\n" not in message

    def test_make_service_direct(self) -> None:
        """makeService itself refuses, for callers that build options some other way."""
        from chashd.config import GatewayConfig, load_config

        options = tap.Options()
        options.config = load_config(
            GatewayConfig, {"gateway_id": "g1", "port": "tcp:1:interface=127.0.0.1"}, environ={}
        )
        with pytest.raises(ConfigError, match="--raft-password"):
            tap.makeService(options, reactor=ThreadlessReactor(), raft_factory=LocalRaft)

    def test_admin_routes_beyond_loopback_need_the_token(self) -> None:
        """--port on every interface serves the admin routes: without --token the gateway stops; with it, it runs."""
        password = ["--raft-password", secrets.token_hex(16)]
        options = tap.Options()
        with pytest.raises(SystemExit) as raised:
            options.parseOptions(["--gateway-id", "g1", "--port", "18000", *password])
        assert str(raised.value.code).startswith("chash-gateway: error: option --token is required: --port tcp:18000")
        options = tap.Options()
        options.parseOptions(["--gateway-id", "g1", "--port", "18000", *password, "--token", secrets.token_hex(16)])
        options = tap.Options()
        options.parseOptions([*self.LOOPBACK, *password])
        assert options.config.token is None and options.config.raft_password == password[1]


class FollowerWiringTests(SynchronousTestCase):
    """makeService with --follow: no Raft, a data plane fed by the followed gateways' routing."""

    def test_no_raft_and_not_ready_before_a_routing(self) -> None:
        """A follower needs no Raft password, builds no Raft object, listens on its two ports and is not ready
        before it has a routing; it serves no /ring routes."""
        reactor = ThreadlessReactor()
        rafts: list[Any] = []
        options = tap.Options()
        options.parseOptions(
            ["--gateway-id", "f1", "--port", "tcp:18000:interface=127.0.0.1", "--follow", "http://127.0.0.1:8000",
             "--line-port", "tcp:11299:interface=127.0.0.1"]
        )  # fmt: skip
        service = tap.makeService(options, reactor=reactor, raft_factory=lambda *a: rafts.append(a))  # type: ignore[arg-type]  # never called: records a call
        service.startService()
        reactor.advance(0)
        assert rafts == []
        assert sorted(p for p, _, _, _ in reactor.tcpServers) == [11299, 18000]
        factory: Any = reactor.tcpServers[0][1]
        stub: Any = StubTreq(factory.resource)
        for path, code in (("/ready", 503), ("/ring/status", 404)):
            assert self.successResultOf(stub.get("http://gateway" + path)).code == code
        service.stopService()
