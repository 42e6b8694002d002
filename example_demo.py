"""chashd demo: a consistent-hashing key-value cluster in a few screens.

    ./dev.sh demo                          # starts 3 gateways and 3 kvstores on loopback, then stops them
    ./dev.sh demo --gateway http://h:8000  # against a running cluster (or CHASH_GATEWAY=...)

It writes and reads through both surfaces (HTTP and the memcached text protocol, over a plain socket), shows
the ring and each node's share, a key's preference list, then (on the cluster it started) adds a kvstore and
watches keys move, drains one with SIGTERM, and kills one with kill -9 while reads go on, counting errors.
Every process it starts is stopped at the end, also on Ctrl-C, SIGTERM or a failure. Exit status 0 when
every check held, 1 when one did not, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from chashd.client import ChashError, KVStoreClient, gateway_urls
from chashd.launcher import DaemonError, LocalCluster
from chashd.node import NodeState
from chashd.ring import HashRing


class DemoFailed(Exception):
    """A check of the demo did not hold."""


def screen(number: int, total: int, title: str) -> None:
    """A screen's header."""
    print(f"\n=== {number}/{total}  {title} " + "=" * max(0, 70 - len(title)), flush=True)


def say(text: str = "") -> None:
    """A line of the demo."""
    print(text, flush=True)


def check(ok: bool, what: str) -> None:
    """Print a check and raise ``DemoFailed`` when it does not hold."""
    say(f"  {'ok' if ok else 'FAILED'}: {what}")
    if not ok:
        raise DemoFailed(what)


class LineClient:
    """The memcached text protocol over a plain socket: enough for set, get, gets and incr."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._file = self._sock.makefile("rb")

    def close(self) -> None:
        """Close the connection."""
        self._file.close()
        self._sock.close()

    def _line(self) -> bytes:
        line = self._file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("the server closed the connection")
        return line[:-2]

    def command(self, line: bytes, data: bytes | None = None) -> bytes:
        """Send one command (with its data block) and return the reply line."""
        self._sock.sendall(line + b"\r\n" + (data + b"\r\n" if data is not None else b""))
        return self._line()

    def set(self, key: str, value: bytes, flags: int = 0, exptime: int = 0) -> bytes:
        """``set``: the reply line (``STORED``)."""
        return self.command(f"set {key} {flags} {exptime} {len(value)}".encode(), value)

    def gets(self, key: str) -> tuple[bytes, int, int] | None:
        """``(value, flags, cas)`` or None."""
        self._sock.sendall(f"gets {key}\r\n".encode())
        found = None
        while True:
            line = self._line()
            if line == b"END":
                return found
            _, _, flags, size, cas = line.split()
            value = self._file.read(int(size) + 2)[:-2]
            found = (value, int(flags), int(cas))


def node_keys(status: dict[str, Any]) -> dict[str, Any]:
    """Each node's key count from ``/ring/status``."""
    return {n["id"]: n.get("keys") for n in status.get("nodes", [])}


def show_keys(status: dict[str, Any], started: float) -> str:
    """One line: time, epoch, rebalancing, each node's state and keys."""
    nodes = "  ".join(f"{n['id']} {n.get('state')}:{n.get('keys')}" for n in status.get("nodes", []))
    moving = "yes" if status.get("rebalancing") else "no "
    return f"  {time.monotonic() - started:5.1f}s  epoch {status.get('epoch'):>3}  rebalancing {moving}  {nodes}"


def watch(
    client: KVStoreClient, until: Callable[[dict[str, Any]], bool], timeout: float, interval: float = 0.5
) -> dict[str, Any]:
    """Print the cluster's status whenever it changes until ``until(status)`` holds (or ``timeout``)."""
    started = time.monotonic()
    last = ""
    status = client.status()
    while True:
        line = show_keys(status, started)
        if line.split("s  ", 1)[1] != last:
            say(line)
            last = line.split("s  ", 1)[1]
        if until(status):
            return status
        if time.monotonic() - started > timeout:
            say(f"  (still not there after {timeout:g}s)")
            return status
        time.sleep(interval)
        status = client.status()


class Reader(threading.Thread):
    """Reads known keys through the gateways in a loop, counting successes and errors."""

    def __init__(self, urls: list[str], keys: dict[str, bytes]) -> None:
        super().__init__(daemon=True)
        self._client = KVStoreClient(urls, timeout=10)
        self._keys = list(keys.items())
        self.stop = threading.Event()
        self.reads = 0
        self.errors: list[str] = []

    def run(self) -> None:
        rng = random.Random(7)
        while not self.stop.is_set():
            key, value = rng.choice(self._keys)
            try:
                got = self._client.get(key)
                if got != value:
                    self.errors.append(f"{key}: got {got!r}")
            except ChashError as e:
                self.errors.append(f"{key}: {e}")
            self.reads += 1
        self._client.close()


def surfaces(client: KVStoreClient, urls: list[str], lines: list[tuple[str, int]]) -> None:
    """Screen 2: HTTP and the memcached protocol see the same data."""
    http_a = KVStoreClient(urls[0])
    http_b = KVStoreClient(urls[-1])
    line_a = LineClient(*lines[-1])
    try:
        say(f"  HTTP PUT {urls[0]}/kv/greeting  (X-Chash-Flags: 5)")
        http_a.put("greeting", "hello from HTTP", flags=5)
        got = line_a.gets("greeting")
        say(f"  memcached 'gets greeting' on {lines[-1][0]}:{lines[-1][1]} -> {got}")
        check(
            got is not None and got[0] == b"hello from HTTP" and got[1] == 5, "the line protocol reads the HTTP write"
        )
        item = http_b.get_item("greeting")
        check(item is not None and got is not None and item.cas == got[2], "the ETag is the memcached cas unique")

        reply = line_a.set("counter", b"41", flags=0)
        say(f"  memcached 'set counter 0 0 2' -> {reply.decode()}")
        reply = line_a.command(b"incr counter 1")
        say(f"  memcached 'incr counter 1' -> {reply.decode()}")
        value = http_b.get("counter")
        say(f"  HTTP GET {urls[-1]}/kv/counter -> {value!r}")
        check(value == b"42", "HTTP reads the incremented counter through another gateway")
        binary = bytes(range(256))
        line_a.set("binary", binary)
        check(http_a.get("binary") == binary, "256 bytes with \\r\\n inside survive both surfaces")
    finally:
        line_a.close()


def ring_screen(client: KVStoreClient) -> HashRing:
    """Screen 3: the ring and each node's share."""
    ring_json = client.ring()
    ring = HashRing.from_dict(ring_json)
    status = client.status()
    keys = node_keys(status)
    say(f"  epoch {ring.epoch}, ketama (md5), {ring_json.get('points_per_node')} points per node at equal weights")
    say(f"  {'NODE':12} {'STATE':8} {'WEIGHT':>6} {'SHARE':>7} {'KEYS':>6}")
    shares = ring.shares()
    for node in ring_json["nodes"]:
        share = shares.get(node["id"], 0.0)
        bar = "#" * round(share * 60)
        say(
            f"  {node['id']:12} {node.get('state', '?'):8} {node['weight']:>6} {100 * share:>6.1f}% "
            f"{keys.get(node['id'], '-')!s:>6}  {bar}"
        )
    check(abs(sum(shares.values()) - 1) < 1e-9, "the shares cover the whole ring")
    return ring


def lookup_screen(client: KVStoreClient, ring: HashRing) -> None:
    """Screen 4: a key's preference list, from the gateway and computed locally."""
    found = client.lookup("user:42")
    names = [n["id"] for n in found["nodes"]]
    say(f"  GET /ring/lookup/user:42 -> hash {found['hash']}, N={found['replicas']}:")
    for i, node in enumerate(found["nodes"]):
        role = "primary" if i == 0 else f"replica {i}"
        say(f"    {i + 1}. {node['id']:12} {node['host']}:{node['port']} line {node['line_port']}  {role}")
    local = list(ring.preference_list("user:42", len(names)))
    say(f"  HashRing.from_dict(GET /ring).preference_list('user:42', {len(names)}) -> {local}")
    check(local == names, "any ketama client computes the same placement from the published ring")


def load_keys(client: KVStoreClient, count: int) -> dict[str, bytes]:
    """Write ``count`` keys and return them."""
    keys = {f"demo:{i}": f"value {i}".encode() for i in range(count)}
    started = time.monotonic()
    for key, value in keys.items():
        client.put(key, value)
    elapsed = time.monotonic() - started
    say(f"  wrote {count} keys in {elapsed:.1f}s ({count / elapsed:.0f} writes/s, N=3 W=2 through the gateways)")
    return keys


def all_readable(client: KVStoreClient, keys: dict[str, bytes]) -> int:
    """How many of ``keys`` read back with their value."""
    return sum(1 for key, value in keys.items() if client.get(key) == value)


def settled(count: int) -> Callable[[dict[str, Any]], bool]:
    """The status shows no move under way and every up node reported its keys."""

    def done(status: dict[str, Any]) -> bool:
        nodes = [n for n in status.get("nodes", []) if n.get("state") == NodeState.UP]
        return not status.get("rebalancing") and len(nodes) == count and all(n.get("keys") is not None for n in nodes)

    return done


def rebalancing_screens(cluster: LocalCluster, client: KVStoreClient, args: argparse.Namespace) -> None:
    """Screens 5 and 6: join, drain, kill -9 while reading."""
    screen(5, 6, "adding a kvstore: keys move to it")
    keys = load_keys(client, args.keys)
    watch(client, settled(3), timeout=args.wait)
    say("  starting kvstore-D ...")
    new = cluster.add_kvstore(wait=True, timeout=args.wait)
    status = watch(client, lambda s: settled(4)(s) and bool(node_keys(s).get(new.name)), timeout=args.wait)
    moved = node_keys(status).get(new.name) or 0
    check(moved > 0, f"{new.name} received {moved} keys (with N=3 over 4 nodes, each holds about 3/4 of them)")
    check(all_readable(client, keys) == len(keys), f"all {len(keys)} keys read back after the move")

    screen(6, 6, "draining one kvstore (SIGTERM), killing another (kill -9) while reads go on")
    leaving = cluster.kvstores[1]
    say(f"  SIGTERM {leaving.name} (pid {leaving.pid}): it asks to leave, hands its keys off, deregisters, exits")
    reader = Reader(cluster.gateway_urls, keys)
    reader.start()
    leaving.signal(signal.SIGTERM)
    watch(client, lambda s: leaving.name not in node_keys(s) and settled(3)(s), timeout=args.wait)
    status_code = leaving.wait(args.wait)
    check(status_code in (0, -signal.SIGTERM), f"{leaving.name} exited cleanly (status {status_code})")

    victim = cluster.kvstores[0]
    say(f"  kill -9 {victim.name} (pid {victim.pid}) while a reader keeps reading ...")
    victim.kill()
    watch(
        client,
        lambda s: node_keys(s).get(victim.name, "gone") == "gone" and not s.get("rebalancing"),
        timeout=args.dead_after + args.wait,
    )
    time.sleep(0.5)
    reader.stop.set()
    reader.join(30)
    say(f"  {reader.reads} reads during the drain and the kill, {len(reader.errors)} errors")
    for error in reader.errors[:5]:
        say(f"    {error}")
    check(not reader.errors, "no read failed while a node drained and another died")
    readable = all_readable(client, keys)
    check(readable == len(keys), f"{readable}/{len(keys)} keys read back with their value at the end")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    parser = argparse.ArgumentParser(description="chashd demo")
    parser.add_argument("--gateway", action="append", metavar="URL", help="use a running cluster (repeatable)")
    parser.add_argument("--line", metavar="HOST:PORT", help="its memcached port (default: the gateway host, 11211)")
    parser.add_argument("--fast", action="store_true", help="fewer keys and shorter timers (for the test suite)")
    parser.add_argument("--keys", type=int, help="keys to write before the ring changes (default 2000, fast 300)")
    parser.add_argument("--workdir", type=Path, help="where the demo's cluster keeps logs (default: a temp dir)")
    args = parser.parse_args(argv)
    args.keys = args.keys or (300 if args.fast else 2000)
    args.wait = 60.0 if args.fast else 120.0
    args.dead_after = 3.0 if args.fast else 10.0
    external = args.gateway or os.environ.get("CHASH_GATEWAY")

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    # Ctrl-C stops the demo and its cluster even when started with SIGINT ignored (as a parent's system() or a
    # background job leaves it): Python raises KeyboardInterrupt only if it found SIGINT at its default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cluster: LocalCluster | None = None
    try:
        screen(1, 6, "the cluster")
        if external:
            urls = gateway_urls(args.gateway)
            host = urlsplit(urls[0]).hostname or "127.0.0.1"
            line = args.line or f"{host}:11211"
            lines = [(line.rsplit(":", 1)[0].strip("[]"), int(line.rsplit(":", 1)[1]))]
            say(f"  using the running cluster at {', '.join(urls)} (memcached protocol on {line})")
        else:
            workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chashd-demo-"))
            say(f"  starting 3 gateways (Raft) and 3 kvstores on loopback; logs in {workdir} ...")
            cluster = LocalCluster(
                workdir,
                gateways=3,
                kvstores=3,
                gateway_args=["--probe-interval", "0.3", "--down-after", "2", "--dead-after", str(args.dead_after)],
            )
            cluster.start(timeout=args.wait)
            for text in cluster.describe().splitlines():
                say("  " + text.split("  log ")[0])
            urls = cluster.gateway_urls
            lines = [(cluster.host, cluster.line_ports[g.name]) for g in cluster.gateways]
        token = cluster.token if cluster is not None else os.environ.get("CHASH_TOKEN")
        client = KVStoreClient(urls, timeout=10, token=token)
        status = client.status()
        say(f"  leader {status['leader']}, epoch {status['epoch']}, N={status['replicas']} "
            f"W={status['write_quorum']} R={status['read_quorum']}, {len(status['nodes'])} kvstores")  # fmt: skip

        screen(2, 6, "one key-value store, two surfaces: HTTP and the memcached protocol")
        surfaces(client, urls, lines)
        screen(3, 6, "the ring: each node's share of the hash space")
        ring = ring_screen(client)
        screen(4, 6, "where a key lives: its preference list")
        lookup_screen(client, ring)
        if cluster is None:
            say("\n(screens 5 and 6 start and stop processes: they run on a cluster the demo starts itself)")
        else:
            rebalancing_screens(cluster, client, args)
        say("\ndemo finished: every check held")
        return 0
    except DemoFailed as e:
        say(f"\ndemo failed: {e}")
        return 1
    except (ChashError, DaemonError, OSError) as e:
        say(f"\ndemo failed: {e}")
        return 1
    except KeyboardInterrupt:
        say("\ninterrupted")
        return 130
    finally:
        if cluster is not None:
            say("stopping the cluster the demo started ...")
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish stopping even if asked twice
            cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
