"""The kvstore's side of rebalancing with real processes: one ``twistd -n chash-gateway`` and real
``chash-kvstore`` daemons on loopback (``LocalCluster``). A kvstore joins and receives its share; a SIGTERM
drains one (exit status 0 or -15) and its keys stay readable through the gateway from the others."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chashd.launcher import Daemon, LocalCluster, clean_environ, http_json
from tests.integration.conftest import wait_until

pytestmark = pytest.mark.slow

KEYS = 600
N1 = ("--replicas", "1", "--write-quorum", "1", "--read-quorum", "1", "--probe-interval", "0.2")


def put(base: str, key: str, value: bytes) -> int:
    """``PUT /kv/{key}``; the status."""
    request = urllib.request.Request(f"{base}/kv/{key}", data=value, method="PUT")
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status)


def get(base: str, key: str) -> bytes | None:
    """``GET /kv/{key}``; None on 404."""
    try:
        with urllib.request.urlopen(f"{base}/kv/{key}", timeout=10) as response:
            return bytes(response.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def health(daemon: Daemon) -> dict[str, Any]:
    """A kvstore's ``GET /health`` (raises when it does not answer)."""
    body = daemon.health(timeout=5)
    if body is None:
        raise OSError(f"{daemon.name} does not answer /health")
    return body


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """One gateway and one SQLite kvstore, N=1; every process stopped by its pid at teardown."""
    with LocalCluster(
        tmp_path, gateways=1, kvstores=1, engine="sqlite", gateway_args=N1, env=clean_environ()
    ) as started:
        yield started


def settled(cluster: LocalCluster) -> bool:
    """The gateway says no move is under way and every running kvstore's data follows its epoch."""
    status = cluster.status()
    if status["rebalancing"]:
        return False
    for daemon in cluster.kvstores:
        if daemon.running():
            handoff = health(daemon)["handoff"]
            if handoff["running"] or handoff["synced_epoch"] != status["epoch"]:
                return False
    return True


class HandoffTests:
    """Join and drain with real daemons."""

    def test_join_then_drain(self, cluster: LocalCluster) -> None:
        """A second kvstore joins and receives about half the keys (N=1); after a SIGTERM the first one hands
        everything to it, deregisters and exits cleanly; every key is still readable through the gateway."""
        gateway = cluster.gateways[0].url
        values = {f"key-{i}": b"value-%d" % i for i in range(KEYS)}
        for key, value in values.items():
            assert put(gateway, key, value) == 204
        first = cluster.kvstores[0]
        assert health(first)["keys"] == KEYS

        second = cluster.add_kvstore()
        wait_until("the join's handoff", lambda: settled(cluster), timeout=60)
        keys = [health(d)["keys"] for d in (first, second)]
        assert sum(keys) == KEYS and 0.25 * KEYS < keys[1] < 0.75 * KEYS, keys
        assert health(second)["handoff"]["records_received"] == keys[1]
        assert health(first)["handoff"]["records_sent"] == keys[1]
        for key, value in values.items():
            assert get(gateway, key) == value, key
        with urllib.request.urlopen(first.url + "/metrics", timeout=5) as response:
            metrics = response.read()
        assert b"chashd_handoff_records_sent_total" in metrics
        assert b"chashd_gc_full_collections_total" in metrics
        received = http_json(second.url + "/stats")[1]
        assert received["cmd_xbulk"] > 0 and received["cmd_xput"] == 0, received  # bulk pages, no xmove

        first.signal(signal.SIGTERM)
        status = first.wait(60)
        assert status in (0, -signal.SIGTERM), (status, first.log_tail())
        log = first.log_path.read_text()
        assert "drained and deregistered" in log
        wait_until("the map without the drained node", lambda: len(cluster.status()["nodes"]) == 1, timeout=60)
        assert health(second)["keys"] == KEYS
        for key, value in values.items():
            assert get(gateway, key) == value, key
        code, body = http_json(gateway + "/ring/nodes/" + first.name)
        assert code == 404, body


def test_a_throttled_join(tmp_path: Path) -> None:
    """With --handoff-rate 300 (records a second) a join that moves about 300 records takes about a second;
    the limit shows in /health, /metrics and chash status."""
    with LocalCluster(
        tmp_path,
        gateways=1,
        kvstores=1,
        engine="sqlite",
        gateway_args=N1,
        kvstore_args=["--handoff-rate", "300"],
        env=clean_environ(),
    ) as cluster:
        gateway = cluster.gateways[0].url
        for i in range(KEYS):
            assert put(gateway, f"key-{i}", b"value") == 204
        first = cluster.kvstores[0]
        assert health(first)["handoff"]["rate_limit"] == "300 records/s"
        with urllib.request.urlopen(first.url + "/metrics", timeout=5) as response:
            assert b"chashd_handoff_rate_limit_records_per_second 300.0" in response.read()
        cluster.add_kvstore()
        wait_until("the join's handoff", lambda: settled(cluster), timeout=60)
        moved = health(first)["handoff"]["records_sent"]
        assert moved > KEYS // 4
        # pages of 30 records (a tenth of a second's worth), the first sent at once
        done = re.search(r"done: (\d+) records pushed, \d+ dropped in ([\d.]+)s", first.log_path.read_text())
        assert done is not None and int(done[1]) == moved
        assert float(done[2]) >= 0.9 * (moved - 30) / 300, done[0]
        status = subprocess.run(
            [sys.executable, "-m", "chashd.cli", "status"],
            capture_output=True,
            env={**clean_environ(), "CHASH_GATEWAY": gateway},
            timeout=60,
        )
        assert "limit 300 records/s" in status.stdout.decode(), status
