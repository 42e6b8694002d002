"""Slow-replica benchmark: the latency of reads and read-modify-writes while one kvstore is paused (SIGSTOP).

    python bench/slow_replica.py [--seconds 8] [--clients 8] [--keys 3000] [--rmw-percent 20] [--workdir DIR]

For each of two gateway settings, starts one real gateway and three real kvstores (memory engine, N=3,
W=2, R=2) on loopback (``LocalCluster``), sets ``--keys`` counters to 0, then runs ``--clients`` closed-loop
line-protocol clients through the gateway (each one request in flight: ``incr`` of a random key for
``--rmw-percent`` of the requests, ``get`` otherwise) for two phases of ``--seconds``: every kvstore up, then
kvstore-B paused with SIGSTOP. The gateway probes every second and marks a node down after 60 failed
probes, so the paused node stays ``up`` in the ring throughout: what is measured is the router meeting it.

- ``hedged``: the defaults, ``--hedge-after 0.05`` (a read asks the next replica after 50 ms) and
  ``--primary-timeout 0.5`` (a read-modify-write fails over from its primary after 0.5 s);
- ``baseline``: ``--hedge-after 0 --primary-timeout 0`` (no hedging, no failover) with the 5 s request
  timeout: every request that meets the paused node waits for it until the request timeout, as every
  request did before hedging and failover.

Prints, per setting and phase, requests/s, errors, p50/p99/max of gets and of incrs, the gateway's CPU per
request, and the ratios of the paused phase's p99 to the all-up phase's. Targets: with hedging, the p99 of
gets while paused at most 0.25 s and of incrs at most 1.0 s (the primary timeout twice). Every process is
stopped by its pid at the end (after SIGCONT), also on failure.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from handoff import LineClient, cpu_seconds

from chashd.launcher import LocalCluster

TARGET_GET_P99 = 0.25
TARGET_RMW_P99 = 1.0
SETTINGS = {
    "hedged": ["--hedge-after", "0.05", "--primary-timeout", "0.5"],
    "baseline": ["--hedge-after", "0", "--primary-timeout", "0"],
}


def key(i: int) -> bytes:
    return b"slow-%06d" % i


def ask(client: LineClient, request: bytes, end: bytes) -> bool:
    """Send one request and read its reply (up to ``end``); False for an error reply."""
    client.sock.sendall(request)
    reply = client.read_until(end)
    return not reply.startswith((b"SERVER_ERROR", b"CLIENT_ERROR", b"ERROR"))


class Load:
    """Closed-loop clients recording (start, kind, seconds, ok) per request (monotonic start times)."""

    def __init__(self, port: int, clients: int, keys: int, rmw_percent: int) -> None:
        self.port = port
        self.clients = clients
        self.keys = keys
        self.rmw_percent = rmw_percent
        self.stop = threading.Event()
        self.samples: list[tuple[float, str, float, bool]] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(seed,), daemon=True) for seed in range(clients)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        client = LineClient(self.port)
        mine: list[tuple[float, str, float, bool]] = []
        try:
            while not self.stop.is_set():
                k = key(rng.randrange(self.keys))
                began = time.monotonic()
                if rng.randrange(100) < self.rmw_percent:
                    ok = ask(client, b"incr %s 1\r\n" % k, b"\r\n")
                    kind = "incr"
                else:
                    ok = ask(client, b"get %s\r\n" % k, b"END\r\n")
                    kind = "get"
                mine.append((began, kind, time.monotonic() - began, ok))
        finally:
            client.close()
            with self._lock:
                self.samples.extend(mine)


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One gateway setting: the figures of each phase."""
    gateway_args = ["--probe-interval", "1", "--down-after", "60", "--request-timeout", "5", *SETTINGS[name]]
    with LocalCluster(workdir / name, gateways=1, kvstores=3, gateway_args=gateway_args) as cluster:
        port = cluster.line_ports[cluster.gateways[0].name]
        loader = LineClient(port)
        batch = 200
        for first in range(0, args.keys, batch):
            last = min(args.keys, first + batch)
            loader.sock.sendall(b"".join(b"set %s 0 0 1\r\n0\r\n" % key(i) for i in range(first, last)))
            loader.read_count(b"STORED\r\n", last - first)
        loader.close()
        victim = next(k for k in cluster.kvstores if k.name == "kvstore-B")
        gateway_pid = cluster.gateways[0].pid
        assert gateway_pid is not None
        load = Load(port, args.clients, args.keys, args.rmw_percent)
        figures: dict[str, Any] = {}
        windows: dict[str, tuple[float, float]] = {}
        load.start()
        try:
            for phase in ("up", "paused"):
                if phase == "paused":
                    victim.signal(signal.SIGSTOP)
                cpu = cpu_seconds(gateway_pid)
                began = time.monotonic()
                time.sleep(args.seconds)
                windows[phase] = (began, time.monotonic())
                figures[phase] = {"cpu": cpu_seconds(gateway_pid) - cpu}
        finally:
            victim.signal(signal.SIGCONT)
            load.join()
    for phase, entry in figures.items():
        # A request counts for a phase when it began and ended in it (those under way at SIGSTOP count for none).
        start, end = windows[phase]
        samples = [s for s in load.samples if start <= s[0] and s[0] + s[2] <= end]
        entry["requests"] = len(samples)
        entry["errors"] = sum(1 for s in samples if not s[3])
        for kind in ("get", "incr"):
            times = [s[2] for s in samples if s[1] == kind]
            entry[kind] = (percentile(times, 0.5), percentile(times, 0.99), max(times, default=float("nan")))
        entry["cpu_us"] = 1e6 * entry["cpu"] / max(1, len(samples))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each phase")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients, one request in flight each")
    parser.add_argument("--keys", type=int, default=3000, help="counters read and incremented")
    parser.add_argument("--rmw-percent", type=int, default=20, help="share of incr among the requests")
    parser.add_argument("--workdir", type=Path, default=None, help="where logs go (default: a temporary dir)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chashd-slow-"))
    results = {name: run(name, args, workdir) for name in SETTINGS}
    print(f"{args.clients} clients, {args.rmw_percent}% incr, {args.keys} keys, {args.seconds:g} s per phase")
    print("| setting | phase | req/s | errors | get p50 / p99 / max (ms) | incr p50 / p99 / max (ms) | gw CPU/req |")
    print("|---|---|---|---|---|---|---|")
    for name, figures in results.items():
        for phase, f in figures.items():
            get = " / ".join(f"{1000 * v:.1f}" for v in f["get"])
            incr = " / ".join(f"{1000 * v:.1f}" for v in f["incr"])
            rate = f["requests"] / args.seconds
            print(f"| {name} | {phase} | {rate:,.0f} | {f['errors']} | {get} | {incr} | {f['cpu_us']:.0f} us |")
    ok = True
    for name, figures in results.items():
        up, paused = figures["up"], figures["paused"]
        ratios = [paused[kind][1] / up[kind][1] if up[kind][1] else float("nan") for kind in ("get", "incr")]
        print(f"{name}: p99 paused / all up: get {ratios[0]:.1f}x, incr {ratios[1]:.1f}x")
    hedged = results["hedged"]["paused"]
    for kind, target in (("get", TARGET_GET_P99), ("incr", TARGET_RMW_P99)):
        met = hedged[kind][1] <= target
        ok = ok and met
        verdict = "met" if met else "NOT met"
        p99 = 1000 * hedged[kind][1]
        print(f"hedged {kind} p99 while paused: {p99:.0f} ms (target <= {1000 * target:.0f} ms): {verdict}")
    base = results["baseline"]["paused"]
    print(
        f"baseline while paused: get p99 {1000 * base['get'][1]:.0f} ms, incr p99 {1000 * base['incr'][1]:.0f} ms; "
        f"requests done while paused, hedged / baseline: {hedged['requests'] / max(1, base['requests']):.0f}x"
    )
    print(f"logs: {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
