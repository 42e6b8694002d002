"""Memory engine at its limit: a kvstore that keeps evicting beside the same load with no limit, in one run.

    python bench/memory_limit.py [--seconds 10] [--warmup 3] [--rounds 3] [--keys 10000] [--limit-share 0.5]

Load (bench/kvstore.py's generator, bench/loadgen.c): 50 connections, one request in flight each, 90% get /
10% set, 32-byte keys drawn uniformly from ``--keys`` (all set first), 100-byte values. Two real
``twistd -n chash-kvstore --engine memory`` daemons, started afresh for each of ``--rounds`` rounds:

- ``unlimited``: no ``--memory-limit``; every key stays, every get hits;
- ``limited``: ``--memory-limit`` set to ``--limit-share`` of what the keys are accounted to cost (keys,
  values, versions and ``ITEM_OVERHEAD`` each), so that about that share of them fits: every set of a key
  that was evicted evicts another, for as long as the load runs.

Side by side: in each round both daemons run at the same time, both on core 1, each driven by its own
generator on core 0 (taskset) over the same window, so that whatever else loads the machine loads both alike;
the kernel shares core 1 evenly between two busy processes, so the one that spends less CPU per request
serves more. ``--apart`` runs them one after the other instead, each with core 1 to itself (the ratio then
also carries the load's changes between the two windows).

Printed per run: ops/s, p50/p99 latency, the server's CPU per request, and for ``limited`` the evictions per
second and the get hit ratio over the measured window (from ``stats``). Then the ratio limited / unlimited
(target >= 0.9x): within each round (the median is the figure), best round of each, and by server CPU per
request.

First, in process (no sockets, CPU time of this process, so that other load on the machine counts less):
the same mix fed to the line protocol over ``LocalBackend`` and a ``MemoryEngine`` with and without the
limit, one request per ``dataReceived``, rounds interleaved; the median of 7. ``--inprocess`` runs only that.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvstore import _Sink, build_loadgen, drive, load_parser, pinned, requests, stop, wait_port

from chashd.launcher import clean_environ, free_ports, twistd_command
from chashd.storage.memory import ITEM_OVERHEAD

TARGET = 0.9
NAMES = ("unlimited", "limited")
MIB = 1024 * 1024
#: The header and writer id a record packs beside its value (see chashd.storage.memory).
RECORD_HEADER = 31 + len("bench-limited")


def stats(port: int) -> dict[str, int]:
    """The numeric ``stats`` of the line protocol at 127.0.0.1:``port``."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"stats\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    result: dict[str, int] = {}
    for line in data.split(b"\r\n"):
        parts = line.split(b" ")
        if len(parts) == 3 and parts[0] == b"STAT" and parts[2].isdigit():
            result[parts[1].decode()] = int(parts[2])
    return result


def limit_mib(args: argparse.Namespace) -> int:
    """The ``--memory-limit`` under which about ``--limit-share`` of the keys fit."""
    per_key = 32 + RECORD_HEADER + int(args.value_size) + ITEM_OVERHEAD
    return max(1, round(int(args.keys) * per_key * float(args.limit_share) / MIB))


def start(name: str, args: argparse.Namespace, work: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start one kvstore on core 1 (``limited`` with the memory limit); the process and its line port, once
    it accepts connections."""
    port, http_port = free_ports(2)
    command = [
        "--node-id", f"bench-{name}", "--port", f"tcp:{http_port}:interface=127.0.0.1",
        "--line-port", f"tcp:{port}:interface=127.0.0.1", "--idle-timeout", "0", "--engine", "memory",
    ]  # fmt: skip
    if name == "limited":
        command += ["--memory-limit", str(limit_mib(args))]
    log = work / f"{name}.log"
    env = clean_environ()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            pinned(twistd_command("chash-kvstore", command), 1), stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        wait_port(port, process, log)
    except BaseException:
        stop(process)
        raise
    return process, port


def run(name: str, process: subprocess.Popen[bytes], port: int, loadgen: Path, args: argparse.Namespace) -> Any:
    """Drive the kvstore ``name`` from core 0: the generator's figures, its CPU per request and, from ``stats``
    over the measured window, the evictions per second and the get hit ratio."""
    samples: list[dict[str, int]] = []
    # The counters at the start and the end of the window drive() measures CPU over (see its docstring).
    window = (args.warmup + 1.0, args.warmup + 1.0 + max(0.5, args.seconds - 1.5))
    timers = [threading.Timer(at, lambda: samples.append(stats(port))) for at in window]
    for timer in timers:
        timer.start()
    try:
        figures = drive(loadgen, port, 0, {name: process.pid}, args)
    except RuntimeError as e:
        raise SystemExit(f"{name}: {e}") from None
    finally:
        for timer in timers:
            timer.join()
    figures["server_cpu"] = figures["server_cpu"][name]
    if len(samples) == 2:
        first, last = samples
        elapsed = window[1] - window[0]
        figures["evictions_per_s"] = (last.get("evictions", 0) - first.get("evictions", 0)) / elapsed
        hits = last["get_hits"] - first["get_hits"]
        gets = hits + last["get_misses"] - first["get_misses"]
        figures["hit_ratio"] = hits / gets if gets else 0.0
        figures["limit_maxbytes"] = last.get("limit_maxbytes", 0)
        figures["bytes"] = last.get("bytes", 0)
    return figures


def round_of(loadgen: Path, args: argparse.Namespace, work: Path) -> dict[str, dict[str, Any]]:
    """One round: both kvstores side by side (or, with ``--apart``, one after the other); their figures."""
    figures: dict[str, dict[str, Any]] = {}
    if args.apart:
        for name in NAMES:
            process, port = start(name, args, work)
            try:
                figures[name] = run(name, process, port, loadgen, args)
            finally:
                stop(process)
        return figures
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        for name in NAMES:
            servers[name] = start(name, args, work)
        failures: list[BaseException] = []

        def one(name: str) -> None:
            try:
                figures[name] = run(name, *servers[name], loadgen, args)
            except BaseException as e:  # re-raised in the main thread
                failures.append(e)

        threads = [threading.Thread(target=one, args=(name,)) for name in NAMES]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
        return figures
    finally:
        for process, _ in servers.values():
            stop(process)


def inprocess(args: argparse.Namespace) -> None:
    """The line protocol's CPU per request over the limited engine beside the unlimited one, without sockets."""
    from twisted.internet import reactor

    from chashd.kvstore.backend import LocalBackend
    from chashd.memcache.server import MemcacheServerFactory
    from chashd.storage.memory import MemoryEngine

    def factory(limit: int) -> MemcacheServerFactory:
        backend = LocalBackend(MemoryEngine(limit_bytes=limit), "bench-limited", reactor, 1024 * 1024)
        return MemcacheServerFactory(backend, reactor, idle_timeout=0)

    def cost(factory: MemcacheServerFactory, mix: list[bytes]) -> float:
        protocol: Any = factory.buildProtocol(None)
        protocol.makeConnection(_Sink())
        data_received = protocol.dataReceived
        start = time.process_time()
        for request in mix:
            data_received(request)
        return 1e6 * (time.process_time() - start) / len(mix)

    factories = {"unlimited": factory(0), "limited": factory(limit_mib(args) * MIB)}
    preload = requests(args.keys, args.keys, 0, args.value_size)
    mix = requests(50_000, args.keys, args.get_percent, args.value_size)
    for made in factories.values():
        cost(made, preload)
    costs: dict[str, list[float]] = {name: [] for name in factories}
    for _ in range(7):
        for name, made in factories.items():
            costs[name].append(cost(made, mix))
    median = {name: sorted(values)[3] for name, values in costs.items()}
    stats = factories["limited"].backend.stats()
    print(
        f"in process, {len(mix):,} requests a round, median of 7: unlimited {median['unlimited']:.2f} us a request, "
        f"limited {median['limited']:.2f} us ({stats['evictions']:,} evictions in all): "
        f"{median['unlimited'] / median['limited']:.2f}x"
    )


def main() -> None:
    """Run the benchmark and print its table."""
    parser = load_parser(__doc__, rounds=3)
    parser.add_argument("--limit-share", type=float, default=0.5, help="share of the keys the limit holds")
    parser.add_argument("--apart", action="store_true", help="run the two servers one after the other")
    args = parser.parse_args()
    inprocess(args)
    if args.inprocess:
        return
    with tempfile.TemporaryDirectory(prefix="chashd-bench-") as work_dir:
        loadgen = build_loadgen(Path(work_dir))
        work = Path(work_dir)
        print(
            f"\nload: {args.connections} connections, {args.get_percent}% get, {args.keys} keys of 32 bytes, "
            f"{args.value_size}-byte values, {args.seconds:g}s after {args.warmup:g}s warm-up; generator on core "
            f"0, servers on core 1; limited: --memory-limit {limit_mib(args)} (about {args.limit_share:.0%} of "
            f"the keys fit); {args.rounds} round(s), {'one server after the other' if args.apart else 'side by side'}"
        )
        print(
            f"{'server':10} {'round':>5} {'ops/s':>10} {'p50 us':>7} {'p99 us':>7} {'errors':>6} {'us/op':>6} "
            f"{'evictions/s':>11} {'hit ratio':>9}"
        )
        best: dict[str, dict[str, Any]] = {}
        rounds: list[dict[str, dict[str, Any]]] = []
        for number in range(1, args.rounds + 1):
            rounds.append(round_of(loadgen, args, work))
            for name, figures in rounds[-1].items():
                if name not in best or figures["ops_per_s"] > best[name]["ops_per_s"]:
                    best[name] = figures
                print(
                    f"{name:10} {number:5d} {figures['ops_per_s']:10,.0f} {figures['p50_us']:7.0f} "
                    f"{figures['p99_us']:7.0f} {figures['errors']:6d} {figures['cpu_us_per_op']:6.1f} "
                    f"{figures.get('evictions_per_s', 0):11,.0f} {figures.get('hit_ratio', 0):9.2f}",
                    flush=True,
                )
        ratio = best["limited"]["ops_per_s"] / best["unlimited"]["ops_per_s"]
        paired = sorted(r["limited"]["ops_per_s"] / r["unlimited"]["ops_per_s"] for r in rounds)
        cpu = sorted(r["unlimited"]["cpu_us_per_op"] / r["limited"]["cpu_us_per_op"] for r in rounds)
        median = paired[len(paired) // 2]
        verdict = "ok" if median >= TARGET else "MISSED"
        limited = best["limited"]
        print(
            f"\nlimited / unlimited ops/s within each round: {', '.join(f'{x:.2f}' for x in paired)}, median "
            f"{median:.2f}x (target >= {TARGET}x) {verdict}; best round of each {ratio:.2f}x; by server CPU per "
            f"request: {', '.join(f'{x:.2f}' for x in cpu)}, median {cpu[len(cpu) // 2]:.2f}x"
        )
        print(
            f"limited, best round: {limited.get('evictions_per_s', 0):,.0f} evictions/s "
            f"({limited.get('evictions_per_s', 0) / limited['ops_per_s']:.1%} of requests), get hit ratio "
            f"{limited.get('hit_ratio', 0):.2f}, bytes {limited.get('bytes', 0) / MIB:.1f} of "
            f"{limited.get('limit_maxbytes', 0) / MIB:.0f} MiB"
        )


if __name__ == "__main__":
    main()
