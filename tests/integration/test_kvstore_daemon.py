"""A real kvstore daemon: both surfaces over one engine, durability across kill -9, clear errors."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest
from pymemcache.client.base import Client

from chashd.launcher import ClusterSecrets, clean_environ, free_ports, twistd_command
from tests.integration.conftest import StartDaemon

pytestmark = pytest.mark.slow

BINARY = bytes(range(256)) + b"\r\nEND\r\n\x00"


def _request(url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _kvstore(start_daemon: StartDaemon, *args: str):  # type: ignore[no-untyped-def]
    """A kvstore on loopback without a cluster token: both surfaces open to plain clients (SECURITY.md)."""
    (line,) = free_ports(1)
    daemon = start_daemon(
        "chash-kvstore", "--node-id", "kv-1", "--line-port", f"tcp:{line}:interface=127.0.0.1", *args,
        env={"CHASHD_TOKEN": ""},
    )  # fmt: skip
    return daemon, Client(("127.0.0.1", line), connect_timeout=5, timeout=5, default_noreply=False)


class SurfacesTests:
    """What one surface writes, the other reads byte for byte."""

    def test_line_to_http_and_back(self, start_daemon: StartDaemon) -> None:
        """Values with any bytes and flags cross surfaces; the ETag is the cas unique."""
        daemon, mc = _kvstore(start_daemon)
        assert mc.set(b"bin", BINARY, flags=77)
        status, headers, body = _request(daemon.url + "/kv/bin")
        assert status == 200 and body == BINARY
        assert headers["X-Chash-Flags"] == "77"
        _, cas = mc.gets(b"bin")
        assert headers["ETag"] == f'"{int(cas)}"'

        status, _, _ = _request(daemon.url + "/kv/from-http", "PUT", BINARY, {"X-Chash-Flags": "5"})
        assert status == 204
        assert mc.get(b"from-http") == BINARY
        assert mc.raw_command(b"get from-http", b"END\r\n").startswith(b"VALUE from-http 5 %d\r\n" % len(BINARY))

    def test_conditional_put_and_delete(self, start_daemon: StartDaemon) -> None:
        """If-Match is cas, If-None-Match: * is add; DELETE answers 204 then 404."""
        daemon, _ = _kvstore(start_daemon)
        assert _request(daemon.url + "/kv/c", "PUT", b"1", {"If-None-Match": "*"})[0] == 204
        assert _request(daemon.url + "/kv/c", "PUT", b"2", {"If-None-Match": "*"})[0] == 412
        etag = _request(daemon.url + "/kv/c")[1]["ETag"]
        assert _request(daemon.url + "/kv/c", "PUT", b"3", {"If-Match": etag})[0] == 204
        assert _request(daemon.url + "/kv/c", "PUT", b"4", {"If-Match": etag})[0] == 412
        assert _request(daemon.url + "/kv/c")[2] == b"3"
        assert _request(daemon.url + "/kv/c", "DELETE")[0] == 204
        assert _request(daemon.url + "/kv/c", "DELETE")[0] == 404

    def test_ttl_header(self, start_daemon: StartDaemon) -> None:
        """X-Chash-TTL -1 stores an already expired value; a positive TTL is reported as an expiry time."""
        daemon, _ = _kvstore(start_daemon)
        assert _request(daemon.url + "/kv/gone", "PUT", b"v", {"X-Chash-TTL": "-1"})[0] == 204
        assert _request(daemon.url + "/kv/gone")[0] == 404
        assert _request(daemon.url + "/kv/ttl", "PUT", b"v", {"X-Chash-TTL": "100"})[0] == 204
        assert "X-Chash-Expires-At" in _request(daemon.url + "/kv/ttl")[1]

    @pytest.mark.parametrize(
        ("method", "path", "body", "headers", "code"),
        [
            ("GET", "/kv/missing", None, {}, 404),
            ("GET", "/kv/" + "k" * 251, None, {}, 400),
            ("GET", "/kv/a%20b", None, {}, 400),
            ("PUT", "/kv/k", b"v", {"X-Chash-TTL": "soon"}, 400),
            ("PUT", "/kv/k", b"v", {"X-Chash-Flags": "-1"}, 400),
            ("PUT", "/kv/k", b"v", {"If-Match": "nonsense"}, 400),
            ("PUT", "/kv/k", b"x" * 2048, {}, 413),
            ("POST", "/kv/k", b"v", {}, 405),
            ("GET", "/nowhere", None, {}, 404),
        ],
    )
    def test_errors_are_problems(  # type: ignore[no-untyped-def]
        self, start_daemon: StartDaemon, method, path, body, headers, code
    ) -> None:
        """Bad input gets a 4xx application/problem+json with a detail, and the daemon keeps serving."""
        daemon, _ = _kvstore(start_daemon, "--max-value-size", "1024")
        status, answer_headers, answer = _request(daemon.url + path, method, body, headers)
        assert status == code
        assert answer_headers["Content-Type"] == "application/problem+json"
        assert json.loads(answer)["detail"]
        assert daemon.health() is not None

    def test_stats_and_metrics(self, start_daemon: StartDaemon) -> None:
        """/stats counts keys and bytes; /metrics exports them in Prometheus text."""
        daemon, mc = _kvstore(start_daemon)
        mc.set(b"a", b"12345")
        mc.get(b"a")
        stats = json.loads(_request(daemon.url + "/stats")[2])
        assert stats["keys"] == 1 and stats["value_bytes"] == 5 and stats["get_hits"] == 1
        metrics = _request(daemon.url + "/metrics")[2].decode()
        assert "chashd_keys 1.0" in metrics and "chashd_get_hits_total 1.0" in metrics


class DurabilityTests:
    """Acknowledged writes survive kill -9; a bad database stops the daemon."""

    def test_kill_9(self, start_daemon: StartDaemon, tmp_path: Path) -> None:
        """Every write acknowledged before a SIGKILL is there after a restart on the same data dir."""
        data = tmp_path / "data"
        daemon, mc = _kvstore(start_daemon, "--data-dir", str(data))
        for i in range(300):
            assert mc.set(b"key%d" % i, b"value%d" % i)
        assert _request(daemon.url + "/kv/http-key", "PUT", b"over http")[0] == 204
        daemon.signal(signal.SIGKILL)
        daemon.wait(10)
        again, mc2 = _kvstore(start_daemon, "--data-dir", str(data))
        found = mc2.get_many([b"key%d" % i for i in range(300)])
        assert len(found) == 300 and found[b"key299"] == b"value299"
        assert _request(again.url + "/kv/http-key")[2] == b"over http"

    def test_corrupt_database(self, tmp_path: Path) -> None:
        """A data dir whose database is not SQLite stops the daemon with one line naming the file."""
        data = tmp_path / "data"
        data.mkdir()
        (data / "kvstore.db").write_bytes(b"\x13garbage" * 1000)
        http, line = free_ports(2)
        result = subprocess.run(
            twistd_command(
                "chash-kvstore",
                ["--node-id", "a", "--port", str(http), "--line-port", str(line), "--data-dir", str(data)],
            ),
            env=clean_environ(**ClusterSecrets.generate().environ()),
            capture_output=True,
            timeout=60,
        )
        assert result.returncode != 0
        lines = result.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and "kvstore.db" in lines[0]
        assert (data / "kvstore.db").read_bytes() == b"\x13garbage" * 1000
