"""Rebalancing with real processes: join, drain and failure move the data, and nothing
acknowledged is lost."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pytest
from pymemcache.client.base import Client

from chashd.launcher import Daemon, LocalCluster, clean_environ
from chashd.ring import HashRing

pytestmark = pytest.mark.slow

FAST = ["--probe-interval", "0.3", "--down-after", "2"]


def http(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def client(cluster: LocalCluster, gateway: int = 0) -> Client:
    port = cluster.line_ports[cluster.gateways[gateway].name]
    return Client(("127.0.0.1", port), connect_timeout=5, timeout=15, default_noreply=False)


def wait_settled(cluster: LocalCluster, nodes: int, timeout: float = 120.0) -> dict:  # type: ignore[type-arg]
    """Wait until the ring holds ``nodes`` nodes, all up, and no rebalancing is under way."""
    deadline = time.monotonic() + timeout
    status: dict = {}  # type: ignore[type-arg]
    while time.monotonic() < deadline:
        status = cluster.status(0)
        states = [n["state"] for n in status["nodes"]]
        if len(states) == nodes and set(states) == {"up"} and status["rebalancing"] is False:
            return status
        time.sleep(0.3)
    raise AssertionError(f"not settled after {timeout}s: {json.dumps(status)[:2000]}")


def ring_of(cluster: LocalCluster) -> HashRing:
    status, body = http(cluster.gateway_urls[0] + "/ring")
    assert status == 200
    return HashRing.from_dict(json.loads(body))


def owned(ring: HashRing, keys: Iterable[str], n: int) -> Counter[str]:
    """How many of ``keys`` each node holds a replica of under ``ring``."""
    counts: Counter[str] = Counter()
    for key in keys:
        counts.update(ring.preference_list(key, n))
    return counts


def node_keys(daemons: list[Daemon]) -> dict[str, int]:
    """Each running kvstore's own count of the records it holds."""
    result = {}
    for daemon in daemons:
        if daemon.running():
            body = daemon.health()
            assert body is not None
            result[daemon.name] = body["keys"]
    return result


class Writer(threading.Thread):
    """Writes fresh keys named ``<prefix>:<i>`` (and deletes some right after) through a gateway until stopped."""

    def __init__(self, cluster: LocalCluster, prefix: str) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.prefix = prefix
        self.stopping = threading.Event()
        self.acknowledged: dict[str, bytes] = {}
        self.deleted: list[str] = []
        #: Acknowledged sets whose delete failed: each holds its value or a tombstone, either is right.
        self.undecided: dict[str, bytes] = {}
        self.unacknowledged: set[str] = set()

    def run(self) -> None:
        mc = client(self.cluster)
        i = 0
        while not self.stopping.is_set():
            key = f"{self.prefix}:{i}"
            value = b"background %d" % i
            try:
                stored = mc.set(key, value)
            except Exception:
                stored = False
                mc = client(self.cluster)
            if not stored:
                self.unacknowledged.add(key)
            elif i % 10 == 0:
                try:
                    if mc.delete(key):
                        self.deleted.append(key)
                    else:
                        self.acknowledged[key] = value
                except Exception:
                    # A failed delete (SERVER_ERROR, e.g. a map change between its read and its apply) may or
                    # may not have been applied: the key holds its value or a tombstone.
                    self.undecided[key] = value
                    mc = client(self.cluster)
            else:
                self.acknowledged[key] = value
            i += 1
            time.sleep(0.005)

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterable[LocalCluster]:
    with LocalCluster(tmp_path, gateways=1, kvstores=3, gateway_args=FAST, env=clean_environ()) as running:
        yield running


class JoinAndDrainTests:
    """3 kvstores and 3,000 keys; 2 join; 2 drain; a writer keeps writing all along."""

    def test_join_then_drain(self, cluster: LocalCluster) -> None:
        """After each move every key reads back, the shares are even, and no node keeps what it does not own."""
        mc = client(cluster)
        base = {f"key:{i}": b"value %d" % i for i in range(3000)}
        for key, value in base.items():
            assert mc.set(key, value)
        writer = Writer(cluster, "join")
        writers = [writer]
        writer.start()
        try:
            cluster.add_kvstore(wait=False)
            cluster.add_kvstore(wait=False)
            time.sleep(1.0)
            writer.stopping.set()
            writer.join(30)
            wait_settled(cluster, 5)
            self.check(cluster, base, writers, nodes=5)

            # Its own key names: the first writer's keys are still held and must not count as this one's.
            writer = Writer(cluster, "drain")
            writers.append(writer)
            writer.start()
            leaving = cluster.kvstores[:2]
            for daemon in leaving:
                daemon.signal(signal.SIGTERM)
            for daemon in leaving:
                assert daemon.wait(120) in (0, -signal.SIGTERM), daemon.log_tail()
            writer.stopping.set()
            writer.join(30)
            wait_settled(cluster, 3)
            self.check(cluster, base, writers, nodes=3)
        finally:
            writer.stop()

    def check(self, cluster: LocalCluster, base: dict[str, bytes], writers: list[Writer], nodes: int) -> None:
        """Every acknowledged value reads back, deletions stay deleted, and each node holds exactly its share."""
        mc = client(cluster)
        expected = dict(base)
        deleted: list[str] = []
        unacknowledged: set[str] = set()
        undecided: dict[str, bytes] = {}
        for writer in writers:
            expected.update(writer.acknowledged)
            deleted.extend(writer.deleted)
            undecided.update(writer.undecided)
            unacknowledged |= writer.unacknowledged
        keys = list(expected)
        for start in range(0, len(keys), 100):
            chunk = keys[start : start + 100]
            got = mc.get_many(chunk)
            assert {k: got.get(k) for k in chunk} == {k: expected[k] for k in chunk}
        for key in deleted:
            assert mc.get(key) is None
        for key, value in undecided.items():
            assert mc.get(key) in (None, value), key
        ring = ring_of(cluster)
        n = min(3, nodes)
        # Tombstones are records too: the deleted keys count on their replicas.
        shares = owned(ring, [*keys, *deleted, *undecided], n)
        extra = owned(ring, unacknowledged, n)
        held = node_keys(cluster.kvstores)
        assert set(held) == set(ring.nodes)
        for node, count in held.items():
            assert shares[node] <= count <= shares[node] + extra[node], (node, count, shares[node])
            assert abs(count - n * len(keys) / nodes) <= 0.25 * n * len(keys) / nodes, (node, count)


class FailureTests:
    """4 kvstores with N=3: after a kill -9 and --dead-after, every key has 3 replicas again."""

    def test_replication_restored(self, tmp_path: Path) -> None:
        """The survivors copy each affected record to the node that enters its preference list."""
        with LocalCluster(
            tmp_path, gateways=1, kvstores=4, gateway_args=[*FAST, "--dead-after", "3"], env=clean_environ()
        ) as cluster:
            mc = client(cluster)
            keys = [f"dur:{i}" for i in range(600)]
            for key in keys:
                assert mc.set(key, key.encode())
            victim = cluster.kvstores[1]
            victim.signal(signal.SIGKILL)
            victim.wait(10)
            wait_settled(cluster, 3)
            survivors = [k for k in cluster.kvstores if k.running()]
            for key in keys:
                holders = [k.name for k in survivors if http(f"{k.url}/kv/{key}") == (200, key.encode())]
                assert len(holders) == 3, (key, holders)
