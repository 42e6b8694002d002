"""Both twistd plugins start real services, answer /health, and stop cleanly."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from chashd.launcher import (
    LOWEST_FREE_PORT,
    RESERVED_FOR,
    ClusterSecrets,
    Daemon,
    clean_environ,
    ephemeral_ports,
    free_ports,
    twistd_command,
)
from tests.integration.conftest import StartDaemon

pytestmark = pytest.mark.slow

CLEAN_EXIT = (0, -signal.SIGTERM)


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class StartStopTests:
    """Start, serve /health, stop on SIGTERM."""

    def test_kvstore(self, start_daemon: StartDaemon) -> None:
        """A kvstore serves /health with its id and exits cleanly on SIGTERM."""
        node = start_daemon("chash-kvstore", "--node-id", "kv-a")
        body = node.health()
        assert body is not None and body["role"] == "kvstore" and body["id"] == "kv-a"
        assert node.stop() in CLEAN_EXIT
        assert "Server Shut Down" in node.log_tail(5)

    def test_gateway(self, start_daemon: StartDaemon) -> None:
        """A gateway serves /health with its id and exits cleanly on SIGTERM."""
        (raft,) = free_ports(1)
        gateway = start_daemon("chash-gateway", "--gateway-id", "gw-1", "--raft-port", str(raft))
        body = gateway.health()
        assert body is not None and body["role"] == "gateway" and body["id"] == "gw-1"
        assert gateway.stop() in CLEAN_EXIT

    def test_seed_variables(self, start_daemon: StartDaemon) -> None:
        """The short environment variable names configure a kvstore."""
        node = start_daemon("chash-kvstore", env={"NODE_ID": "kvstore-A"})
        body = node.health()
        assert body is not None and body["id"] == "kvstore-A"

    def test_kvstore_keeps_retrying_unreachable_gateway(self, start_daemon: StartDaemon) -> None:
        """A kvstore whose gateway is down still serves and logs its retries."""
        (dead,) = free_ports(1)
        node = start_daemon("chash-kvstore", "--node-id", "kv-b", "--gateway", f"127.0.0.1:{dead}")
        deadline = time.monotonic() + 15
        while node.log_tail(200).count("cannot register") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert node.log_tail(200).count("cannot register") >= 2
        body = node.health()
        assert body is not None and body["registered"] is False


class FreePortsTests:
    """chashd.launcher.free_ports, which every test daemon's ports come from."""

    def test_below_the_ephemeral_range(self) -> None:
        """Distinct ports, each one bindable, none in the range outgoing connections take their ports from
        (such a port could be taken before the daemon listens on it)."""
        ports = free_ports(200)
        assert len(set(ports)) == 200
        assert all(LOWEST_FREE_PORT <= p < ephemeral_ports()[0] for p in ports)
        for port in ports[:20]:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))

    def test_not_handed_out_twice(self, tmp_path: Path) -> None:
        """Ports handed out a moment ago (by this process or another: the ledger file they share) are not
        handed out again until ``RESERVED_FOR`` has passed, so suites side by side do not start two daemons
        on one port; a ledger line older than that, or one that is not a port and a time, reserves nothing."""
        ledger = tmp_path / "ledger"
        first = free_ports(100, ledger=ledger)
        second = free_ports(100, ledger=ledger)
        assert not set(first) & set(second)
        assert {int(line.split()[0]) for line in ledger.read_text().splitlines()} == {*first, *second}

        low = ephemeral_ports()[0]
        left = [p for p in range(LOWEST_FREE_PORT + 7, low, 997)][:5]
        stale = time.time() - RESERVED_FOR - 5
        lines = [f"{p} {time.time():.3f}" for p in range(LOWEST_FREE_PORT, low) if p not in left]
        ledger.write_text("\n".join([*lines, f"{left[0]} {stale:.3f}", "garbage", "12 x"]) + "\n")
        assert set(free_ports(3, ledger=ledger)) <= set(left)
        with pytest.raises(OSError, match="no 6 free ports"):
            free_ports(6, ledger=ledger)


class BadConfigTests:
    """A bad configuration stops the daemon before it binds, with one line."""

    @pytest.mark.parametrize(
        ("role", "args", "env", "expected"),
        [
            ("chash-kvstore", ["--node-id", "a", "--line-port", "eleven"], {}, "--line-port"),
            ("chash-kvstore", [], {}, "--node-id"),
            ("chash-kvstore", ["--node-id", "a", "--frobnicate"], {}, "--frobnicate"),
            ("chash-gateway", ["--gateway-id", "g"], {"RAFT_PORT": "70000"}, "RAFT_PORT"),
            ("chash-kvstore", ["--node-id", "a"], {}, "option --token is required: --port tcp:"),
            ("chash-gateway", ["--gateway-id", "g"], {"CHASHD_TOKEN": "t"}, "option --raft-password is required"),
        ],
    )
    def test_refused(self, role: str, args: list[str], env: dict[str, str], expected: str) -> None:
        """Exit status is non-zero, stderr is one line naming the option, and the port stayed free."""
        (port,) = free_ports(1)
        result = subprocess.run(
            twistd_command(role, ["--port", str(port), *args]),
            env=clean_environ(**env),
            capture_output=True,
            timeout=60,
        )
        assert result.returncode != 0
        lines = result.stderr.decode().strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert expected in lines[0] and "error" in lines[0]
        assert _port_is_free(port)

    def test_bad_yaml(self, tmp_path) -> None:  # type: ignore[no-untyped-def]
        """A YAML file that does not parse is named in the error."""
        path = tmp_path / "kv.yaml"
        path.write_text("node-id: [a\n")
        result = subprocess.run(
            twistd_command("chash-kvstore", ["--config", str(path)]),
            env=clean_environ(),
            capture_output=True,
            timeout=60,
        )
        assert result.returncode != 0
        assert "kv.yaml" in result.stderr.decode() and "YAML" in result.stderr.decode()

    def test_port_in_use(self, start_daemon: StartDaemon, cluster_secrets: ClusterSecrets) -> None:
        """A port already taken stops the daemon with status 1 and says so."""
        first = start_daemon("chash-kvstore", "--node-id", "a")
        result = subprocess.run(
            twistd_command(
                "chash-kvstore",
                ["--node-id", "b", "--port", f"tcp:{first.http_port}:interface=127.0.0.1", "--line-port", "0"],
            ),
            env=clean_environ(**cluster_secrets.environ()),
            capture_output=True,
            timeout=60,
        )
        assert result.returncode == 1
        assert b"cannot listen" in result.stdout


class JsonLogTests:
    """``--log-format json`` (and twistd's ``--logger chashd.logs.json_stdout``) write one JSON object a line."""

    @pytest.mark.parametrize(
        ("args", "twistd_options"),
        [(["--log-format", "json"], []), ([], ["--logger=chashd.logs.json_stdout"])],
        ids=["log-format", "logger"],
    )
    def test_json_lines(self, tmp_path: Path, args: list[str], twistd_options: list[str]) -> None:
        """Every line of a kvstore's output parses as JSON with time, level, system, text and the event's
        fields, from start to the shutdown."""
        http, line = free_ports(2)
        args = ["--node-id", "json", "--port", f"tcp:{http}:interface=127.0.0.1", "--line-port", str(line), *args]
        daemon = Daemon(
            "chash-kvstore", "json", args, http, tmp_path / "json.log",
            env=clean_environ(**ClusterSecrets.generate().environ()),
            twistd_options=twistd_options,
        )  # fmt: skip
        try:
            daemon.start().wait_healthy(30)
        finally:
            assert daemon.stop() in CLEAN_EXIT
        events = [json.loads(line) for line in daemon.log_path.read_text().splitlines()]
        assert all({"time", "level", "system", "text"} <= e.keys() for e in events)
        listening = [e for e in events if e.get("namespace") == "chashd.daemon.ListenService"]
        assert {e["what"] for e in listening} == {"HTTP", "line protocol"}
        assert all(e["level"] == "info" and "listening on" in e["text"] for e in listening)
        assert any("Server Shut Down" in e["text"] for e in events)

    def test_text_by_default(self, start_daemon: StartDaemon) -> None:
        """Without the option a gateway writes twistd's text lines, none of them JSON."""
        (raft,) = free_ports(1)
        gateway = start_daemon("chash-gateway", "--gateway-id", "gw-text", "--raft-port", str(raft))
        gateway.wait_healthy(30)
        lines = gateway.log_tail(200).splitlines()
        assert any("HTTP listening on" in line for line in lines)
        assert not any(line.startswith("{") for line in lines)

    def test_bad_format_refused(self) -> None:
        """An unknown format stops the daemon with one line naming the option."""
        result = subprocess.run(
            twistd_command("chash-kvstore", ["--node-id", "a", "--log-format", "xml"]),
            env=clean_environ(),
            capture_output=True,
            timeout=60,
        )
        assert result.returncode != 0
        assert "--log-format" in result.stderr.decode() and "json" in result.stderr.decode()


class DataDirLockTests:
    """Two daemons never share a data directory."""

    @pytest.mark.parametrize(("role", "id_flag"), [("chash-kvstore", "--node-id"), ("chash-gateway", "--gateway-id")])
    def test_second_daemon_refused(
        self, start_daemon: StartDaemon, cluster_secrets: ClusterSecrets, tmp_path: Path, role: str, id_flag: str
    ) -> None:
        """The second daemon on a data dir stops with one line naming the holder's pid; the first goes on."""
        data = tmp_path / "shared"
        extra = ["--line-port", f"tcp:{free_ports(1)[0]}:interface=127.0.0.1"]
        if role == "chash-gateway":
            extra += ["--raft-port", str(free_ports(1)[0])]
        first = start_daemon(role, id_flag, "one", "--data-dir", str(data), *extra)
        (port,) = free_ports(1)
        result = subprocess.run(
            twistd_command(role, [id_flag, "two", "--port", str(port), "--data-dir", str(data)]),
            env=clean_environ(**cluster_secrets.environ()),
            capture_output=True,
            timeout=60,
        )
        assert result.returncode != 0
        lines = result.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and "--data-dir" in lines[0]
        assert first.health() is not None
