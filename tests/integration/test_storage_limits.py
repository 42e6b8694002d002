"""Real kvstore daemons at their storage limits: the memory engine's --memory-limit (eviction or refusal)
and the SQLite engine's --disk-limit, with memcached's counters on ``stats`` and ``/metrics``.

The memory test fills a daemon to twice its limit and checks the resident set it grew by: at most
``RSS_FACTOR`` times the limit plus ``RSS_SLACK`` (what the interpreter's allocator keeps beyond what the
records are accounted to cost; USAGE.md states the same margin).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from pymemcache.client.base import Client

from chashd.launcher import free_ports
from tests.integration.conftest import StartDaemon, http, wait_until

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
RSS_FACTOR = 1.25
RSS_SLACK = 8 * MIB


def _kvstore(start_daemon: StartDaemon, *args: str) -> tuple[Any, Client, int]:
    (line,) = free_ports(1)
    # On loopback without a cluster token: both surfaces open to plain clients (SECURITY.md).
    daemon = start_daemon(
        "chash-kvstore", "--node-id", "kv-1", "--line-port", f"tcp:{line}:interface=127.0.0.1", *args,
        env={"CHASHD_TOKEN": ""},
    )  # fmt: skip
    return daemon, Client(("127.0.0.1", line), connect_timeout=5, timeout=10, default_noreply=False), line


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _stats(port: int, group: bytes = b"") -> dict[str, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"stats" + (b" " + group if group else b"") + b"\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    return {
        line.split(b" ")[1].decode(): line.split(b" ", 2)[2].decode()
        for line in data.split(b"\r\n")
        if line.startswith(b"STAT ")
    }


def _set_raw(port: int, items: list[tuple[bytes, bytes]]) -> list[bytes]:
    """Pipelined sets on one connection; the reply line of each."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"".join(b"set %s 0 0 %d\r\n%s\r\n" % (k, len(v), v) for k, v in items))
        data = b""
        while data.count(b"\r\n") < len(items):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    return data.split(b"\r\n")[: len(items)]


class MemoryLimitTests:
    """--memory-limit with least-recently-used eviction, and --memory-full=error."""

    def test_filled_to_twice_the_limit(self, start_daemon: StartDaemon) -> None:
        """Writing twice the limit evicts the oldest records, keeps the accounted bytes under the limit and the
        resident set within RSS_FACTOR x limit + RSS_SLACK of where it started; the counters say so on both
        surfaces."""
        limit = 32 * MIB
        daemon, mc, line = _kvstore(start_daemon, "--memory-limit", "32")
        value = b"v" * 1000
        mc.set(b"warm-up", value)
        start = _rss(daemon.pid)
        written = 0
        index = 0
        while written < 2 * limit:
            batch = {b"key-%07d" % (index + i): value for i in range(500)}
            assert mc.set_many(batch) == []
            index += len(batch)
            written += len(batch) * (len(value) + 11)
        grown = _rss(daemon.pid) - start
        assert grown <= RSS_FACTOR * limit + RSS_SLACK, f"RSS grew by {grown / MIB:.1f} MiB for a 32 MiB limit"

        stats = _stats(line)
        assert int(stats["limit_maxbytes"]) == limit
        assert limit * 0.9 < int(stats["bytes"]) <= limit
        assert int(stats["evictions"]) == index + 1 - int(stats["curr_items"]) > index // 3
        assert int(stats["total_items"]) == int(stats["cmd_set"]) == index + 1
        assert mc.get(b"key-%07d" % (index - 1)) == value  # the newest stay, the oldest went
        assert mc.get(b"key-%07d" % 0) is None
        stats = _stats(line)
        assert (int(stats["get_hits"]), int(stats["get_misses"]), int(stats["cmd_get"])) == (1, 1, 2)
        assert stats["get_expired"] == "0"
        over_http = json.loads(http(daemon.url + "/stats")[1])
        assert over_http["evictions"] == int(stats["evictions"]) and over_http["limit_maxbytes"] == limit
        metrics = http(daemon.url + "/metrics")[1].decode()
        for name in ("chashd_evictions_total", "chashd_limit_maxbytes", "chashd_bytes", "chashd_curr_items",
                     "chashd_total_items_total", "chashd_get_expired_total", "chashd_cmd_get_total",
                     "chashd_cmd_set_total", "chashd_get_hits_total", "chashd_get_misses_total"):  # fmt: skip
            assert f"\n{name} " in metrics, name

    def test_refusal_mode(self, start_daemon: StartDaemon) -> None:
        """With --memory-full error a write past the limit answers memcached's SERVER_ERROR (HTTP: 507) and
        evicts nothing; a delete makes room again."""
        daemon, mc, line = _kvstore(start_daemon, "--memory-limit", "1", "--memory-full", "error")
        value = b"v" * 4000
        replies = _set_raw(line, [(b"k%04d" % i, value) for i in range(400)])
        stored = replies.count(b"STORED")
        assert 100 < stored < 400
        assert replies[stored:] == [b"SERVER_ERROR out of memory storing object"] * (400 - stored)
        status, body = http(daemon.url + "/kv/more", "PUT", value)
        assert status == 507 and json.loads(body)["detail"].startswith("out of memory storing object")
        assert _stats(line)["evictions"] == "0"
        assert mc.get(b"k0000") == value
        assert mc.delete(b"k0000") and mc.delete(b"k0001")
        assert _set_raw(line, [(b"again", value)]) == [b"STORED"]


class DiskLimitTests:
    """--disk-limit on the SQLite engine."""

    def test_writes_past_the_limit_are_refused(self, start_daemon: StartDaemon, tmp_path: Path) -> None:
        """Past --disk-limit a write answers SERVER_ERROR naming the limit and changes nothing; reads and deletes
        go on, and the pages deletes free take new writes."""
        data = tmp_path / "data"
        daemon, mc, line = _kvstore(start_daemon, "--data-dir", str(data), "--disk-limit", "1")
        value = b"d" * 8000
        replies = _set_raw(line, [(b"k%04d" % i, value) for i in range(300)])
        stored = replies.count(b"STORED")
        assert 50 < stored < 300
        refused = replies[stored]
        assert refused.startswith(b"SERVER_ERROR out of disk space storing object") and b"1 MiB" in refused
        assert mc.get(b"k%04d" % stored) is None and mc.get(b"k0000") == value
        stats = json.loads(http(daemon.url + "/stats")[1])
        assert stats["disk_limit_bytes"] == MIB and stats["disk_bytes"] <= MIB and stats["keys"] == stored
        for i in range(20):
            assert mc.delete(b"k%04d" % i)
        wait_until("a write after deletes", lambda: _set_raw(line, [(b"after", value)]) == [b"STORED"])
