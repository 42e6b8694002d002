"""Gateway benchmark: the gateway's line protocol beside a minimal Twisted proxy and twemproxy, in one run.

    python bench/gateway.py [--seconds 10] [--warmup 3] [--rounds 3] [--targets gateway-n1,gateway-n3,...]
    python bench/gateway.py --inprocess      # only the in-process hot-path check (no sockets)

Load (bench/kvstore.py's, with its generator bench/loadgen.c): 50 connections, each with one request in
flight, 90% get / 10% set, 32-byte keys drawn from 10,000 (all set first), 100-byte values, measured for
``--seconds`` after ``--warmup``; p50/p99 latency and the generator's own CPU.

Targets, each started fresh for each round (rounds interleaved, best round of each counts):

- ``gateway-n1``: one ``twistd -n chash-gateway --replicas 1`` (W=R=1) over three ``chash-kvstore``
  daemons (memory engine), started with ``chashd.launcher.LocalCluster``;
- ``gateway-n3``: the same with N=3, W=2, R=2;
- ``kvstore``: one kvstore daemon directly (memory engine);
- ``proxy-memcached``: bench/proxy_baseline.py (a ``LineReceiver`` proxy that multiplexes every client over
  one pipelined backend connection) in front of one ``memcached -t 1``;
- ``proxy-kvstore``: the same proxy in front of one kvstore (memory engine), so that the backend's own
  work is the gateway's kind of work;
- ``twemproxy``: nutcracker (ketama, md5) over three ``memcached -t 1`` (installed with apt-get when missing).

Pinning, on two cores: the generator runs on core 0 and EVERY server process of a target on core 1 (taskset,
all threads): the gateway and its three kvstores share core 1, and so do the proxy and its backend and
twemproxy and its memcacheds, so each comparison gives each side one core in all. The CPU each server
process used during the measured window is printed too (from /proc), to show where core 1's time went.

Printed: each run, the best round of each target, and the ratios gateway / proxy baseline (targets:
N=1 >= 0.7x, N=3/W=2/R=2 >= 0.35x) and gateway / twemproxy. ``--failover-trials N`` also runs
bench/failover.py (leader failover, median <= 3 s) at the end.

``--inprocess`` measures the Python work per request (CPU time of this process, so that other work on the
machine counts less) without sockets or a running reactor: the gateway's
server protocol, router and kvstore clients over three kvstore server protocols (LocalBackend, MemoryEngine),
and the proxy baseline over a kvstore, connected by in-memory pipes; the time spent in the kvstores is
timed apart, so the gateway's own cost per request and the proxy's can be compared directly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import twemproxy
from kvstore import add_load_options, build_loadgen, pinned, requests, server_commands, stop, wait_port
from kvstore import drive as run_load
from proxy_baseline import BackendProtocol, ProxyFactory

from chashd.launcher import LocalCluster, free_ports

HERE = Path(__file__).resolve().parent
SERVER_CORE, LOAD_CORE = 1, 0
ALL_TARGETS = "gateway-n1,gateway-n3,kvstore,proxy-memcached,proxy-kvstore,twemproxy"
GATEWAY_ARGS = {
    "gateway-n1": ["--replicas", "1", "--write-quorum", "1", "--read-quorum", "1"],
    "gateway-n3": ["--replicas", "3", "--write-quorum", "2", "--read-quorum", "2"],
}
TARGETS = {"gateway-n1": 0.7, "gateway-n3": 0.35}  # x the proxy baseline's ops/s
BASELINES = ("proxy-memcached", "proxy-kvstore")


# -- processes ---------------------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    """This environment without CHASHD_* settings, so that the daemons run with their defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CHASHD_")}


def pin_pid(pid: int, core: int) -> None:
    """Move every thread of ``pid`` to ``core`` (no-op on one core or without taskset)."""
    if shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        return
    subprocess.run(["taskset", "-a", "-p", "-c", str(core), str(pid)], stdout=subprocess.DEVNULL, check=True)


@dataclass
class Running:
    """A started target: the port the generator drives, and its processes by name."""

    port: int
    pids: dict[str, int] = field(default_factory=dict)


class Processes:
    """Plain server processes started on the server core, stopped by their pid at the end."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, command: list[str], port: int) -> subprocess.Popen[bytes]:
        """Start ``command`` on the server core and wait until 127.0.0.1:``port`` accepts connections."""
        log = self.work / f"{name}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                pinned(command, SERVER_CORE), stdout=out, stderr=subprocess.STDOUT, env=clean_env()
            )
        self.started.append(process)
        wait_port(port, process, log)
        return process

    def stop(self) -> None:
        """Stop every process started here, the last one first."""
        for process in reversed(self.started):
            stop(process)
        self.started.clear()


def memcached(processes: Processes, name: str) -> tuple[int, int]:
    """A ``memcached -t 1`` on the server core: its port and pid."""
    (port,) = free_ports(1)
    process = processes.start(name, server_commands("memcached", port, processes.work), port)
    return port, process.pid


def kvstore(processes: Processes, name: str) -> tuple[int, int]:
    """A kvstore daemon (memory engine) on the server core: its line port and pid."""
    (port,) = free_ports(1)
    process = processes.start(name, server_commands("memory", port, processes.work), port)
    return port, process.pid


def proxy(processes: Processes, backend_port: int) -> tuple[int, int]:
    """bench/proxy_baseline.py on the server core in front of ``backend_port``: its port and pid."""
    (port,) = free_ports(1)
    command = [sys.executable, str(HERE / "proxy_baseline.py"), str(port), str(backend_port)]
    process = processes.start("proxy", command, port)
    return port, process.pid


def settled(cluster: LocalCluster, timeout: float = 120.0) -> None:
    """Wait until the gateway routes by one ring: the moves of the kvstores' joins are over (until then
    reads also ask the previous owners, which is not the steady state this benchmark measures)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cluster.status().get("rebalancing") is False:
            return
        time.sleep(0.2)
    raise SystemExit(f"the gateway still reports a rebalancing after {timeout:g}s")


@contextlib.contextmanager
def started(name: str, work: Path, nutcracker: str | None) -> Iterator[Running]:
    """Start target ``name`` (every process on the server core), yield it, stop everything."""
    processes = Processes(work)
    cluster: LocalCluster | None = None
    try:
        if name in GATEWAY_ARGS:
            cluster = LocalCluster(
                work / f"{name}-{time.monotonic_ns()}",
                gateways=1,
                kvstores=3,
                gateway_args=GATEWAY_ARGS[name],
                env=clean_env(),
            )
            cluster.start(timeout=120)
            settled(cluster)
            running = Running(cluster.line_ports[cluster.gateways[0].name])
            for daemon in cluster.gateways + cluster.kvstores:
                assert daemon.pid is not None
                pin_pid(daemon.pid, SERVER_CORE)
                running.pids[daemon.name] = daemon.pid
        elif name == "kvstore":
            port, pid = kvstore(processes, "kvstore")
            running = Running(port, {"kvstore": pid})
        elif name == "proxy-memcached":
            backend, backend_pid = memcached(processes, "memcached")
            port, pid = proxy(processes, backend)
            running = Running(port, {"proxy": pid, "memcached": backend_pid})
        elif name == "proxy-kvstore":
            backend, backend_pid = kvstore(processes, "kvstore")
            port, pid = proxy(processes, backend)
            running = Running(port, {"proxy": pid, "kvstore": backend_pid})
        elif name == "twemproxy":
            assert nutcracker is not None
            backends = [memcached(processes, f"memcached-{i + 1}") for i in range(3)]
            port, stats_port = free_ports(2)
            config = twemproxy.write_config(work / "nutcracker.yml", port, [p for p, _ in backends])
            command = twemproxy.command(nutcracker, config, stats_port, work / "nutcracker.log")
            process = processes.start("nutcracker", command, port)
            running = Running(port, {"nutcracker": process.pid})
            running.pids.update({f"memcached-{i + 1}": pid for i, (_, pid) in enumerate(backends)})
        else:
            raise SystemExit(f"unknown target {name!r}; choose from {ALL_TARGETS}")
        yield running
    finally:
        if cluster is not None:
            cluster.stop()
        processes.stop()


def drive(loadgen: Path, running: Running, args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Run the generator on the load core against ``running``; its figures plus each server's CPU share."""
    try:
        return run_load(loadgen, running.port, LOAD_CORE, running.pids, args)
    except RuntimeError as e:
        raise SystemExit(f"{name}: {e}") from None


# -- in process ------------------------------------------------------------------------------------------


class _Pipe:
    """A transport that keeps what is written until the harness hands it to the other side."""

    disconnecting = False

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.out.extend(data)

    def take(self) -> bytes:
        data = b"".join(self.out)
        self.out.clear()
        return data

    def getPeer(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "127.0.0.1", 0)

    getHost = getPeer

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def loseConnection(self) -> None:
        self.disconnecting = True

    abortConnection = loseConnection


class _Link:
    """A client protocol and a server protocol joined by two pipes; the time the server spends is summed."""

    def __init__(self, client: Any, server: Any) -> None:
        self.client, self.server = client, server
        self.to_server, self.to_client = _Pipe(), _Pipe()
        server.makeConnection(self.to_client)
        client.makeConnection(self.to_server)
        self.server_seconds = 0.0

    def pump(self) -> bool:
        moved = False
        if self.to_server.out:
            data = self.to_server.take()
            start = time.process_time()
            self.server.dataReceived(data)
            self.server_seconds += time.process_time() - start
            moved = True
        if self.to_client.out:
            self.client.dataReceived(self.to_client.take())
            moved = True
        return moved


def _kvstore_server(reactor: Any, name: str) -> Any:
    from chashd.kvstore.backend import LocalBackend
    from chashd.memcache.server import MemcacheServerFactory
    from chashd.storage.memory import MemoryEngine

    backend = LocalBackend(MemoryEngine(), name, reactor, 1024 * 1024)
    return MemcacheServerFactory(backend, reactor, idle_timeout=0).buildProtocol(None)


def _run_inprocess(front: Any, links: list[_Link], mix: list[bytes], connections: int) -> tuple[float, float]:
    """Seconds for the whole mix through ``front`` (``connections`` requests per round), and the share of
    them spent in the backends' servers."""
    from twisted.internet import reactor

    clients = []
    for _ in range(connections):
        protocol = front.buildProtocol(None)
        protocol.makeConnection(_Pipe())
        clients.append(protocol)
    for link in links:
        link.server_seconds = 0.0
    start = time.process_time()
    for first in range(0, len(mix), connections):
        for client, request in zip(clients, mix[first : first + connections]):
            client.dataReceived(request)
        while any([link.pump() for link in links]):
            pass
        reactor.runUntilCurrent()  # type: ignore[attr-defined]  # timers, as one reactor iteration runs them
        for client in clients:
            client.transport.out.clear()
    total = time.process_time() - start
    return total, sum(link.server_seconds for link in links)


def inprocess(args: argparse.Namespace) -> None:
    """The gateway's Python work per request beside the proxy baseline's, without sockets."""
    from twisted.internet import reactor

    from chashd.gateway.router import Placement, Router
    from chashd.memcache.client import KVClientProtocol
    from chashd.memcache.server import MemcacheServerFactory
    from chashd.ring import HashRing

    preload = requests(args.keys, args.keys, 0, args.value_size)
    mix = requests(args.inprocess_requests, args.keys, args.get_percent, args.value_size)
    print(f"in process (no sockets, reactor not running), {len(mix):,} requests, {args.connections} per round:")
    print(f"{'':26} {'us/request':>10} {'in backend':>10} {'own':>8}")
    own: dict[str, float] = {}
    for name, (n, w, r) in (("gateway N=1", (1, 1, 1)), ("gateway N=3/W=2/R=2", (3, 2, 2))):
        nodes = ["kv-a", "kv-b", "kv-c"]
        links = {
            node: _Link(KVClientProtocol(reactor, 4.0, 2 * 1024 * 1024), _kvstore_server(reactor, node))  # type: ignore[arg-type]
            for node in nodes
        }
        clients = {node: link.client for node, link in links.items()}
        router = Router("bench", reactor, clients.__getitem__, n, w, r)  # type: ignore[arg-type]
        router.update(Placement(HashRing(dict.fromkeys(nodes, 1), epoch=1)))
        front = MemcacheServerFactory(router, reactor, idle_timeout=0)  # type: ignore[arg-type]
        _run_inprocess(front, list(links.values()), preload, 100)
        best = min(_run_inprocess(front, list(links.values()), mix, args.connections) for _ in range(3))
        own[name] = _report(name, best, len(mix))
    backend_link = _Link(BackendProtocol(), _kvstore_server(reactor, "kv-proxied"))
    proxy_front = ProxyFactory(backend_link.client)
    _run_inprocess(proxy_front, [backend_link], preload, 100)
    best = min(_run_inprocess(proxy_front, [backend_link], mix, args.connections) for _ in range(3))
    own["proxy baseline"] = _report("proxy baseline (kvstore)", best, len(mix))
    print(
        f"own work / proxy's: N=1 {own['gateway N=1'] / own['proxy baseline']:.2f}x, "
        f"N=3/W=2/R=2 {own['gateway N=3/W=2/R=2'] / own['proxy baseline']:.2f}x"
    )


def _report(name: str, timing: tuple[float, float], count: int) -> float:
    total, backend = timing
    per, in_backend = 1e6 * total / count, 1e6 * backend / count
    print(f"{name:26} {per:10.2f} {in_backend:10.2f} {per - in_backend:8.2f}")
    return per - in_backend


# -- main ------------------------------------------------------------------------------------------------


def _verdict(ratio: float, target: float) -> str:
    return "ok" if ratio >= target else "MISSED"


def summary(results: dict[str, dict[str, Any]], rounds: list[dict[str, float]]) -> None:
    """The best round of each target, and the ratios against the targets."""
    print("\nbest round of each target (server processes' CPU over the measured window, core 1):")
    for name, figures in results.items():
        cpu = ", ".join(f"{n} {c:.0f}%" for n, c in figures["server_cpu"].items())
        print(
            f"{name:16} {figures['ops_per_s']:10,.0f} ops/s  p50 {figures['p50_us']:6.0f} us  "
            f"p99 {figures['p99_us']:6.0f} us  generator CPU {figures['cpu_percent']:3.0f}%  "
            f"server CPU {figures['cpu_us_per_op']:5.1f} us/op  [{cpu}]"
        )
    print()

    def ratio_line(name: str, other: str, target: float | None) -> None:
        if name not in results or other not in results:
            return
        ratio = results[name]["ops_per_s"] / results[other]["ops_per_s"]
        paired = sorted(r[name] / r[other] for r in rounds if name in r and other in r)
        verdict = f" (target >= {target}x) {_verdict(ratio, target)}" if target is not None else ""
        print(
            f"{name} / {other}: {ratio:.2f}x best of each{verdict}; within each round: "
            f"{', '.join(f'{x:.2f}' for x in paired)}"
        )

    for name, target in TARGETS.items():
        for baseline in BASELINES:
            ratio_line(name, baseline, target)
        ratio_line(name, "twemproxy", None)
        ratio_line(name, "kvstore", None)
    for baseline in BASELINES:
        ratio_line(baseline, "twemproxy", None)


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_load_options(parser)
    parser.add_argument("--targets", default=ALL_TARGETS)
    parser.add_argument("--rounds", type=int, default=3, help="runs of every target, interleaved; the best counts")
    parser.add_argument("--inprocess", action="store_true", help="only the in-process hot-path check")
    parser.add_argument("--inprocess-requests", type=int, default=100_000)
    parser.add_argument("--failover-trials", type=int, default=0, help="also run bench/failover.py (0: no)")
    args = parser.parse_args()
    inprocess(args)
    if args.inprocess:
        return
    names = args.targets.split(",")
    nutcracker = twemproxy.ensure_nutcracker() if "twemproxy" in names else None
    if "twemproxy" in names and nutcracker is None:
        names.remove("twemproxy")
    if shutil.which("memcached") is None:
        skipped = [n for n in names if n in ("proxy-memcached", "twemproxy")]
        if skipped:
            print(f"memcached is not installed (apt-get install -y memcached): skipping {', '.join(skipped)}")
            names = [n for n in names if n not in skipped]
    with tempfile.TemporaryDirectory(prefix="chashd-bench-gw-") as tmp:
        work = Path(tmp)
        loadgen = build_loadgen(work)
        print(
            f"\nload: {args.connections} connections, {args.get_percent}% get, {args.keys} keys of 32 bytes, "
            f"{args.value_size}-byte values, {args.seconds:g}s after {args.warmup:g}s warm-up; generator on core "
            f"{LOAD_CORE}, every server process of a target on core {SERVER_CORE}: the gateway and its 3 kvstores "
            f"share that one core (so do each proxy and its backend(s)); {args.rounds} round(s), interleaved"
        )
        print(f"{'target':16} {'round':>5} {'ops/s':>10} {'p50 us':>8} {'p99 us':>8} {'gen CPU':>8} {'errors':>7}")
        results: dict[str, dict[str, Any]] = {}
        rounds: list[dict[str, float]] = []
        for round_number in range(1, args.rounds + 1):
            rounds.append({})
            for name in names:
                with started(name, work, nutcracker) as running:
                    figures = drive(loadgen, running, args, name)
                rounds[-1][name] = figures["ops_per_s"]
                if name not in results or figures["ops_per_s"] > results[name]["ops_per_s"]:
                    results[name] = figures
                print(
                    f"{name:16} {round_number:5d} {figures['ops_per_s']:10,.0f} {figures['p50_us']:8.0f} "
                    f"{figures['p99_us']:8.0f} {figures['cpu_percent']:7.0f}% {figures['errors']:7d}",
                    flush=True,
                )
        summary(results, rounds)
    if args.failover_trials > 0:
        import failover

        print(f"\nleader failover (bench/failover.py --trials {args.failover_trials}):", flush=True)
        failover.main(["--trials", str(args.failover_trials)])


if __name__ == "__main__":
    main()
