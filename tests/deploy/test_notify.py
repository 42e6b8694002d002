"""Type=notify without systemd: real twistd daemons with ``$NOTIFY_SOCKET`` pointing at a datagram socket the
test binds. READY=1 must come once the HTTP port accepts connections, STOPPING=1 on SIGTERM.

No systemd is booted and no manager is asked anything: the test plays the manager's side of sd_notify, which is
one datagram per message on a Unix socket (``@`` at the start of the path naming the abstract namespace).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chashd.launcher import ClusterSecrets, Daemon, clean_environ, free_ports
from tests.deploy.conftest import ROOT

pytestmark = pytest.mark.slow

CLEAN_EXIT = (0, -signal.SIGTERM)


class NotifySocket:
    """A bound AF_UNIX datagram socket that collects sd_notify assignments."""

    def __init__(self, abstract: bool) -> None:
        self._dir = tempfile.mkdtemp(prefix="chashd-notify-", dir="/tmp")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"chashd-test-{os.getpid()}-{id(self)}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = os.path.join(self._dir, "notify")
            self.sock.bind(self.address)
        self.messages: list[str] = []

    def wait_for(self, assignment: str, timeout: float, daemon: Daemon) -> float:
        """Wait until a datagram carries ``assignment`` (``READY=1``); returns when it arrived (monotonic)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, min(0.5, deadline - time.monotonic())))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                if not daemon.running() and assignment not in self.messages:
                    status = daemon.returncode()
                    pytest.fail(f"{daemon.name} exited ({status}) before {assignment}:\n{daemon.log_tail()}")
                continue
            self.messages.extend(data.decode().splitlines())
            if assignment in self.messages:
                return time.monotonic()
        pytest.fail(f"no {assignment} within {timeout:g}s; got {self.messages}:\n{daemon.log_tail()}")

    def close(self) -> None:
        """Close and remove the socket."""
        self.sock.close()
        for entry in Path(self._dir).iterdir():
            entry.unlink()
        os.rmdir(self._dir)


@pytest.fixture(params=[False, True], ids=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest) -> Iterator[NotifySocket]:
    """A notify socket at a file path, or in the abstract namespace."""
    s = NotifySocket(abstract=request.param)
    yield s
    s.close()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons started by a test, each stopped by its own pid at teardown, also on failure."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop(timeout=15)


def accepts(port: int) -> bool:
    """Does 127.0.0.1:port accept a TCP connection right now?"""
    with socket.socket() as s:
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start(role: str, args: list[str], http: int, notify: NotifySocket, tmp_path: Path, daemons: list[Daemon]) -> Daemon:
    """Start ``role`` with NOTIFY_SOCKET set, listening on loopback only."""
    daemon = Daemon(
        role,
        role,
        ["--port", f"tcp:{http}:interface=127.0.0.1", *args],
        http,
        tmp_path / f"{role}.log",
        env=clean_environ(NOTIFY_SOCKET=notify.address, **ClusterSecrets.generate().environ()),
    )
    daemons.append(daemon.start())
    return daemon


def check_lifecycle(daemon: Daemon, notify: NotifySocket) -> None:
    """READY=1 once serving, nothing said to be stopping before; STOPPING=1 on SIGTERM, then a clean exit."""
    notify.wait_for("READY=1", timeout=60, daemon=daemon)
    assert accepts(daemon.http_port), "READY=1 came before the HTTP port accepted connections"
    assert "STOPPING=1" not in notify.messages
    assert daemon.health() is not None
    daemon.signal(signal.SIGTERM)
    notify.wait_for("STOPPING=1", timeout=30, daemon=daemon)
    assert notify.messages.index("READY=1") < notify.messages.index("STOPPING=1")
    assert daemon.wait(30) in CLEAN_EXIT


class NotifyTests:
    """READY=1 and STOPPING=1 from both roles."""

    def test_kvstore(self, notify_socket: NotifySocket, tmp_path: Path, daemons: list[Daemon]) -> None:
        """twistd -n chash-kvstore tells READY=1 once its port accepts connections, STOPPING=1 on SIGTERM."""
        http, line = free_ports(2)
        daemon = start(
            "chash-kvstore",
            ["--node-id", "kv-notify", "--line-port", f"tcp:{line}:interface=127.0.0.1", "--data-dir",
             str(tmp_path / "kv")],
            http, notify_socket, tmp_path, daemons,
        )  # fmt: skip
        check_lifecycle(daemon, notify_socket)

    def test_gateway(self, notify_socket: NotifySocket, tmp_path: Path, daemons: list[Daemon]) -> None:
        """twistd -n chash-gateway tells READY=1 once its port accepts connections, STOPPING=1 on SIGTERM."""
        http, raft, line = free_ports(3)
        daemon = start(
            "chash-gateway",
            ["--gateway-id", "gw-notify", "--raft-port", str(raft), "--line-port",
             f"tcp:{line}:interface=127.0.0.1", "--data-dir", str(tmp_path / "gw")],
            http, notify_socket, tmp_path, daemons,
        )  # fmt: skip
        check_lifecycle(daemon, notify_socket)

    def test_gateway_workers(self, notify_socket: NotifySocket, tmp_path: Path, daemons: list[Daemon]) -> None:
        """With --workers 2, READY=1 comes once both workers serve; SIGTERM stops the workers too."""
        http, raft, line = free_ports(3)
        daemon = start(
            "chash-gateway",
            ["--gateway-id", "gw-workers", "--raft-port", str(raft), "--line-port",
             f"tcp:{line}:interface=127.0.0.1", "--data-dir", str(tmp_path / "gw"), "--workers", "2"],
            http, notify_socket, tmp_path, daemons,
        )  # fmt: skip
        notify_socket.wait_for("READY=1", timeout=60, daemon=daemon)
        with socket.create_connection(("127.0.0.1", line), timeout=10) as client:
            client.sendall(b"stats\r\n")
            reply = b""
            while not reply.endswith(b"END\r\n"):
                chunk = client.recv(65536)
                assert chunk, reply
                reply += chunk
        assert b"STAT workers 2\r\n" in reply
        assert daemon.pid is not None
        workers = subprocess.run(["pgrep", "-P", str(daemon.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        daemon.signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING=1", timeout=30, daemon=daemon)
        assert daemon.wait(30) in CLEAN_EXIT
        assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")], "a worker outlived its gateway"


class HealthcheckScriptTests:
    """The image's health check script against a real daemon."""

    def test_healthy_then_not(self, tmp_path: Path, daemons: list[Daemon]) -> None:
        """Exit 0 while the kvstore serves on LISTEN_PORT; 1 once it has stopped."""
        http, line = free_ports(2)
        daemon = Daemon(
            "chash-kvstore",
            "kv-health",
            ["--node-id", "kv-health", "--port", f"tcp:{http}:interface=127.0.0.1", "--line-port",
             f"tcp:{line}:interface=127.0.0.1"],
            http, tmp_path / "kv.log", env=clean_environ(),
        )  # fmt: skip
        daemons.append(daemon.start())
        daemon.wait_healthy(timeout=60)
        script = [sys.executable, str(ROOT / "deploy" / "healthcheck.py")]
        env = {"PATH": os.environ["PATH"], "LISTEN_PORT": str(http)}
        assert subprocess.run(script, env=env, capture_output=True, timeout=30).returncode == 0
        assert daemon.stop(timeout=15) in CLEAN_EXIT
        result = subprocess.run(script, env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 1 and f"port(s) {http}" in result.stderr
