"""Wiring: makeService builds each role's services and listens where configured."""

from __future__ import annotations

import secrets

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.testing import MemoryReactorClock

from chashd.gateway import tap as gateway_tap
from chashd.kvstore import tap as kvstore_tap


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LISTEN_PORT", "GATEWAY_ADDRESS", "NODE_ID", "GATEWAY_ID", "RAFT_PORT", "PEER_GATEWAYS"):
        monkeypatch.delenv(name, raising=False)
    # Both roles refuse to start without their secrets (tests/unit/test_config.py SecretTests): random ones.
    monkeypatch.setenv("CHASHD_RAFT_PASSWORD", secrets.token_hex(16))
    monkeypatch.setenv("CHASHD_TOKEN", secrets.token_hex(16))


class WiringTests:
    """makeService(options, reactor) with a memory reactor."""

    def test_kvstore_listens(self) -> None:
        """The kvstore listens on its HTTP and line endpoints once started, and leaves no timer when stopped."""
        reactor = MemoryReactorClock()
        options = kvstore_tap.Options()
        options.parseOptions(["--node-id", "a", "--port", "tcp:18080:interface=127.0.0.1", "--line-port", "18081"])
        service = kvstore_tap.makeService(options, reactor=reactor, run_in_thread=maybeDeferred)
        assert reactor.tcpServers == []
        service.startService()
        listening = sorted((port, iface) for port, _, _, iface in reactor.tcpServers)
        assert listening == [(18080, "127.0.0.1"), (18081, "")]
        service.stopService()
        assert reactor.getDelayedCalls() == []

    def test_kvstore_bad_database_stops_before_listening(self, tmp_path) -> None:  # type: ignore[no-untyped-def]
        """A data dir holding a file that is not a database stops makeService with one line."""
        (tmp_path / "kvstore.db").write_bytes(b"this is not a database" * 100)
        options = kvstore_tap.Options()
        options.parseOptions(["--node-id", "a", "--data-dir", str(tmp_path)])
        reactor = MemoryReactorClock()
        with pytest.raises(SystemExit) as info:
            kvstore_tap.makeService(options, reactor=reactor)
        assert "kvstore.db" in str(info.value.code) and "\n" not in str(info.value.code)
        assert reactor.tcpServers == []

    def test_sqlite_needs_data_dir(self) -> None:
        """--engine sqlite without --data-dir is refused by name."""
        options = kvstore_tap.Options()
        options.parseOptions(["--node-id", "a", "--engine", "sqlite"])
        with pytest.raises(SystemExit) as info:
            kvstore_tap.makeService(options, reactor=MemoryReactorClock())
        assert "--engine" in str(info.value.code)

    def test_engine_limits(self, tmp_path) -> None:  # type: ignore[no-untyped-def]
        """--memory-limit/--memory-full reach the memory engine, --disk-limit the SQLite engine, in bytes,
        and the line protocol takes --max-keys."""
        from chashd.kvstore.service import open_engine
        from chashd.storage import MemoryEngine, SQLiteEngine

        options = kvstore_tap.Options()
        options.parseOptions(["--node-id", "a", "--memory-limit", "64", "--memory-full", "error", "--max-keys", "9"])
        engine = open_engine(options.config)
        assert isinstance(engine, MemoryEngine) and engine.stats()["limit_bytes"] == 64 << 20
        assert engine._evict is False
        reactor = MemoryReactorClock()
        service = kvstore_tap.makeService(options, reactor=reactor, run_in_thread=maybeDeferred)
        service.startService()
        try:
            factories = [factory for _, factory, _, _ in reactor.tcpServers]
            assert [f.max_keys for f in factories if hasattr(f, "max_keys")] == [9]
        finally:
            service.stopService()
        options = kvstore_tap.Options()
        options.parseOptions(["--node-id", "a", "--data-dir", str(tmp_path), "--disk-limit", "100"])
        engine = open_engine(options.config)
        try:
            assert isinstance(engine, SQLiteEngine) and engine.stats()["disk_limit_bytes"] == 100 << 20
        finally:
            engine.close()

    def test_kvstore_registers_when_given_gateways(self) -> None:
        """With --gateway, the first announcement is scheduled at start."""
        reactor = MemoryReactorClock()
        options = kvstore_tap.Options()
        options.parseOptions(["--node-id", "a", "--gateway", "127.0.0.1:8000"])
        service = kvstore_tap.makeService(options, reactor=reactor, run_in_thread=maybeDeferred)
        service.startService()
        assert any(call.func.__name__ == "_attempt" for call in reactor.getDelayedCalls())  # type: ignore[attr-defined]
        service.stopService()
        assert reactor.getDelayedCalls() == []

    def test_gateway_listens(self) -> None:
        """The gateway listens on its HTTP endpoint (with the in-memory Raft; tests/unit/test_gateway_tap.py
        has the rest of the gateway's wiring)."""
        from chashd.gateway.testing import LocalRaft

        class Reactor(MemoryReactorClock):
            def callFromThread(self, f, *args, **kw):  # type: ignore[no-untyped-def]
                f(*args, **kw)

        reactor = Reactor()
        options = gateway_tap.Options()
        options.parseOptions(["--gateway-id", "g", "--port", "18000"])
        service = gateway_tap.makeService(options, reactor=reactor, raft_factory=LocalRaft)
        service.startService()
        assert sorted(port for port, *_ in reactor.tcpServers) == [11211, 18000]
        service.stopService()


class SystemdNotifierTests:
    """READY=1 once every condition holds, STOPPING=1 on stop, to $NOTIFY_SOCKET."""

    def test_ready_then_stopping(self, tmp_path) -> None:  # type: ignore[no-untyped-def]
        """The datagrams arrive in order, READY only after the awaited Deferred fired."""
        import socket

        from twisted.internet.defer import Deferred

        from chashd.daemon import SystemdNotifier

        path = str(tmp_path / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.setblocking(False)
            notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": path})
            condition: Deferred[object] = Deferred()
            notifier.wait_for(condition)
            notifier.startService()
            with pytest.raises(BlockingIOError):
                sock.recv(100)
            condition.callback(None)
            assert sock.recv(100) == b"READY=1"
            notifier.stopService()
            assert sock.recv(100) == b"STOPPING=1"

    def test_abstract_socket(self) -> None:
        """An @ path is the abstract namespace."""
        import os
        import socket

        from chashd.daemon import notify_systemd

        name = f"chashd-test-{os.getpid()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind("\0" + name)
            assert notify_systemd("READY=1", {"NOTIFY_SOCKET": "@" + name})
            assert sock.recv(100) == b"READY=1"
        assert not notify_systemd("READY=1", {})
