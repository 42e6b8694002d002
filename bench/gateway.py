"""Gateway benchmark: the gateway's line protocol beside a minimal Twisted proxy and twemproxy, in one run.

    python bench/gateway.py [--seconds 10] [--warmup 3] [--rounds 3] [--targets gateway-n1,gateway-n3,...]
    python bench/gateway.py --inprocess      # only the in-process hot-path check (no sockets)
    python bench/gateway.py --inprocess-rmw  # only the in-process incr check, N=3/W=2/R=2 (no sockets)

Load (bench/kvstore.py's, with its generator bench/loadgen.c): 50 connections, each with one request in
flight, 90% get / 10% set, 32-byte keys drawn from 10,000 (all set first), 100-byte values, measured for
``--seconds`` after ``--warmup``; p50/p99 latency and the generator's own CPU.

Targets, each started fresh for each round (rounds interleaved, best round of each counts):

- ``gateway-n1``: one ``twistd -n chash-gateway --replicas 1`` (W=R=1) over three ``chash-kvstore``
  daemons (memory engine), started with ``chashd.launcher.LocalCluster``;
- ``gateway-n3``: the same with N=3, W=2, R=2;
- ``gateway-w2``: ``gateway-n1`` with ``--workers 2``, nothing pinned but the generator (both cores, the
  backends and the generator sharing them); its router CPU is the main process's and both workers';
- ``kvstore``: one kvstore daemon directly (memory engine);
- ``proxy-memcached``: bench/proxy_baseline.py (a ``LineReceiver`` proxy that multiplexes every client over
  one pipelined backend connection) in front of one ``memcached -t 1``;
- ``proxy-kvstore``: the same proxy in front of one kvstore (memory engine), so that the backend's own
  work is the gateway's kind of work;
- ``twemproxy``: nutcracker (ketama, md5) over three ``memcached -t 1`` (installed with apt-get when missing).

Pinning, on two cores: the generator and every backend (kvstores, memcacheds) run on core 0, the router under
test (the gateway, the proxy, nutcracker; the lone kvstore of ``kvstore``) alone on core 1 (taskset, all
threads). Each router process's own CPU per request (from /proc over the measured window: CPU seconds /
requests) is printed beside ops/s: on this shared, loaded machine it is the figure that survives the noise,
ops/s ratios are not.

Printed: each run, the best round of each target (by router CPU per request), and the issue's targets: gateway
N=1 CPU per request <= 1.3x the proxy's (over memcached) and ops/s >= 0.7x; N=3/W=2/R=2 CPU per request <=
2.2x; ``--workers 2``: summed CPU per request within 1.15x of one process's, connections spread within 20%
between workers, and the throughput per host projected for 4, 8 and 16 cores from the CPU per request beside
twemproxy's. ``--http`` also measures HTTP ``GET /kv`` through the gateway (N=1) against a bare Klein route
(bench/klein_baseline.py) with wrk: requests/s (target >= 0.8x; the best round of each, and the ratio within each
round) and CPU per request, and the same two sites in process (below). ``--failover-trials N``
also runs bench/failover.py (leader failover, median <= 3 s) at the end.

``--inprocess`` measures the Python work per request (CPU time of this process, so that other work on the
machine counts less) without sockets or a running reactor: the gateway's
server protocol, router and kvstore clients over three kvstore server protocols (LocalBackend, MemoryEngine),
and the proxy baseline over a kvstore, connected by in-memory pipes; the time spent in the kvstores is
timed apart, so the gateway's own cost per request and the proxy's can be compared directly. With ``--http``,
also HTTP ``GET /kv`` in process: the gateway's site (N=1, the same pipes) beside the bare Klein route's.
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

from chashd.launcher import LocalCluster, clean_environ, free_ports, http_json

HERE = Path(__file__).resolve().parent
ROUTER_CORE, LOAD_CORE = 1, 0
BACKEND_CORE = LOAD_CORE
ALL_TARGETS = "gateway-n1,gateway-n3,gateway-w2,kvstore,proxy-memcached,proxy-kvstore,twemproxy"
N1 = ["--replicas", "1", "--write-quorum", "1", "--read-quorum", "1"]
GATEWAY_ARGS = {
    "gateway-n1": N1,
    "gateway-n3": ["--replicas", "3", "--write-quorum", "2", "--read-quorum", "2"],
    "gateway-w2": [*N1, "--workers", "2"],
}
#: (target, baseline): the most router CPU per request, x the baseline's; the least ops/s, x the baseline's.
TARGETS = {"gateway-n1": (1.3, 0.7), "gateway-n3": (2.2, None)}
BASELINE = "proxy-memcached"
WORKERS_CPU_TARGET, SPREAD_TARGET = 1.15, 0.20
HTTP_TARGET = 0.8


# -- processes ---------------------------------------------------------------------------------------


def pin_pid(pid: int, core: int) -> None:
    """Move every thread of ``pid`` to ``core`` (no-op on one core or without taskset)."""
    if shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        return
    subprocess.run(["taskset", "-a", "-p", "-c", str(core), str(pid)], stdout=subprocess.DEVNULL, check=True)


@dataclass
class Running:
    """A started target: the port the generator drives, its processes by name, and which of them route."""

    port: int
    pids: dict[str, int] = field(default_factory=dict)
    routers: list[str] = field(default_factory=list)
    cluster: LocalCluster | None = None


class Processes:
    """Plain server processes started on the server core, stopped by their pid at the end."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, command: list[str], port: int, core: int) -> subprocess.Popen[bytes]:
        """Start ``command`` on ``core`` and wait until 127.0.0.1:``port`` accepts connections."""
        log = self.work / f"{name}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(pinned(command, core), stdout=out, stderr=subprocess.STDOUT, env=clean_environ())
        self.started.append(process)
        wait_port(port, process, log)
        return process

    def stop(self) -> None:
        """Stop every process started here, the last one first."""
        for process in reversed(self.started):
            stop(process)
        self.started.clear()


def memcached(processes: Processes, name: str) -> tuple[int, int]:
    """A ``memcached -t 1`` on the backends' core: its port and pid."""
    (port,) = free_ports(1)
    process = processes.start(name, server_commands("memcached", port, processes.work), port, BACKEND_CORE)
    return port, process.pid


def kvstore(processes: Processes, name: str, core: int = BACKEND_CORE) -> tuple[int, int]:
    """A kvstore daemon (memory engine) on ``core``: its line port and pid."""
    (port,) = free_ports(1)
    process = processes.start(name, server_commands("memory", port, processes.work), port, core)
    return port, process.pid


def proxy(processes: Processes, backend_port: int) -> tuple[int, int]:
    """bench/proxy_baseline.py on the router core in front of ``backend_port``: its port and pid."""
    (port,) = free_ports(1)
    command = [sys.executable, str(HERE / "proxy_baseline.py"), str(port), str(backend_port)]
    process = processes.start("proxy", command, port, ROUTER_CORE)
    return port, process.pid


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (a gateway's workers)."""
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return sorted(int(p) for p in found)


def gateway_stats(cluster: LocalCluster) -> dict[str, Any]:
    """``GET /stats`` of the cluster's gateway."""
    status, body = http_json(cluster.gateways[0].url + "/stats", timeout=5)
    return body if status == 200 and isinstance(body, dict) else {}


def workers_serving(cluster: LocalCluster, count: int, timeout: float = 60.0) -> None:
    """Wait until ``count`` workers of the gateway serve."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gateway_stats(cluster).get("workers_serving") == count:
            return
        time.sleep(0.2)
    raise SystemExit(f"the gateway's {count} workers do not all serve after {timeout:g}s")


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
                env=clean_environ(),
            )
            cluster.start(timeout=120)
            settled(cluster)
            running = Running(cluster.line_ports[cluster.gateways[0].name], cluster=cluster)
            for daemon in cluster.kvstores:
                assert daemon.pid is not None
                if name != "gateway-w2":
                    pin_pid(daemon.pid, BACKEND_CORE)
                running.pids[daemon.name] = daemon.pid
            gateway = cluster.gateways[0]
            assert gateway.pid is not None
            running.pids["gateway"] = gateway.pid
            running.routers.append("gateway")
            if name == "gateway-w2":
                workers_serving(cluster, 2)
                for index, pid in enumerate(children(gateway.pid), start=1):
                    running.pids[f"worker-{index}"] = pid
                    running.routers.append(f"worker-{index}")
            else:
                pin_pid(gateway.pid, ROUTER_CORE)
        elif name == "kvstore":
            port, pid = kvstore(processes, "kvstore", ROUTER_CORE)
            running = Running(port, {"kvstore": pid}, ["kvstore"])
        elif name == "proxy-memcached":
            backend, backend_pid = memcached(processes, "memcached")
            port, pid = proxy(processes, backend)
            running = Running(port, {"proxy": pid, "memcached": backend_pid}, ["proxy"])
        elif name == "proxy-kvstore":
            backend, backend_pid = kvstore(processes, "kvstore")
            port, pid = proxy(processes, backend)
            running = Running(port, {"proxy": pid, "kvstore": backend_pid}, ["proxy"])
        elif name == "twemproxy":
            assert nutcracker is not None
            backends = [memcached(processes, f"memcached-{i + 1}") for i in range(3)]
            port, stats_port = free_ports(2)
            config = twemproxy.write_config(work / "nutcracker.yml", port, [p for p, _ in backends])
            command = twemproxy.command(nutcracker, config, stats_port, work / "nutcracker.log")
            process = processes.start("nutcracker", command, port, ROUTER_CORE)
            running = Running(port, {"nutcracker": process.pid}, ["nutcracker"])
            running.pids.update({f"memcached-{i + 1}": pid for i, (_, pid) in enumerate(backends)})
        else:
            raise SystemExit(f"unknown target {name!r}; choose from {ALL_TARGETS}")
        yield running
    finally:
        if cluster is not None:
            cluster.stop()
        processes.stop()


def drive(loadgen: Path, running: Running, args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Run the generator on the load core against ``running``; its figures, each server's CPU share, and the
    router processes' own CPU per request (``router_us_per_op``); with workers, how the connections spread."""
    try:
        figures = run_load(loadgen, running.port, LOAD_CORE, running.pids, args)
    except RuntimeError as e:
        raise SystemExit(f"{name}: {e}") from None
    router_share = sum(figures["server_cpu"][n] for n in running.routers) / 100.0
    figures["router_us_per_op"] = 1e6 * router_share / figures["ops_per_s"] if figures["ops_per_s"] else float("inf")
    workers = [n for n in running.routers if n.startswith("worker-")]
    if workers:  # the workers' own sum, and the main process (Raft, health checks, admin) apart
        share = sum(figures["server_cpu"][n] for n in workers) / 100.0
        figures["workers_us_per_op"] = 1e6 * share / figures["ops_per_s"] if figures["ops_per_s"] else float("inf")
        figures["main_us_per_op"] = figures["router_us_per_op"] - figures["workers_us_per_op"]
    if running.cluster is not None and len(running.routers) > 1:
        connections = [
            int(c) for c in str(gateway_stats(running.cluster).get("worker_total_connections", "")).split(",") if c
        ]
        figures["worker_connections"] = connections
    return figures


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
            node: _Link(KVClientProtocol(reactor, 4.0, 2 * 1024 * 1024), _kvstore_server(reactor, node))
            for node in nodes
        }
        clients = {node: link.client for node, link in links.items()}
        router = Router("bench", reactor, clients.__getitem__, n, w, r)
        router.update(Placement(HashRing(dict.fromkeys(nodes, 1), epoch=1)))
        front = MemcacheServerFactory(router, reactor, idle_timeout=0)
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


def inprocess_rmw(args: argparse.Namespace) -> None:
    """A gateway's Python work per read-modify-write (``incr``, N=3/W=2/R=2: a quorum read, the command at
    the primary, two copies), without sockets: the hot path's cost of the rule that keeps two primaries
    apart (USAGE.md, "Failures and consistency")."""
    import random

    from twisted.internet import reactor

    from chashd.gateway.router import Placement, Router
    from chashd.memcache.client import KVClientProtocol
    from chashd.memcache.server import MemcacheServerFactory
    from chashd.ring import HashRing

    preload = [b"set key:%028d 0 0 1\r\n0\r\n" % i for i in range(args.keys)]
    rng = random.Random(1)
    mix = [b"incr key:%028d 1\r\n" % rng.randrange(args.keys) for _ in range(args.inprocess_requests)]
    nodes = ["kv-a", "kv-b", "kv-c"]
    links = {
        node: _Link(KVClientProtocol(reactor, 4.0, 2 * 1024 * 1024), _kvstore_server(reactor, node)) for node in nodes
    }
    clients = {node: link.client for node, link in links.items()}
    router = Router("bench", reactor, clients.__getitem__, 3, 2, 2)
    router.update(Placement(HashRing(dict.fromkeys(nodes, 1), epoch=1)))
    front = MemcacheServerFactory(router, reactor, idle_timeout=0)
    _run_inprocess(front, list(links.values()), preload, 100)
    best = min(_run_inprocess(front, list(links.values()), mix, args.connections) for _ in range(3))
    print(f"in process, {len(mix):,} incr, {args.connections} per round:")
    _report("gateway N=3/W=2/R=2 incr", best, len(mix))


def _report(name: str, timing: tuple[float, float], count: int) -> float:
    total, backend = timing
    per, in_backend = 1e6 * total / count, 1e6 * backend / count
    print(f"{name:26} {per:10.2f} {in_backend:10.2f} {per - in_backend:8.2f}")
    return per - in_backend


# -- main ------------------------------------------------------------------------------------------------


def summary(results: dict[str, dict[str, Any]], rounds: list[dict[str, dict[str, Any]]]) -> None:
    """The best round of each target (least router CPU per request), and the issue's targets."""
    print("\nbest round of each target (router: its processes' own CPU per request over the measured window):")
    for name, figures in results.items():
        cpu = ", ".join(f"{n} {c:.0f}%" for n, c in figures["server_cpu"].items())
        print(
            f"{name:16} {figures['ops_per_s']:10,.0f} ops/s  router {figures['router_us_per_op']:6.1f} us/op  "
            f"p50 {figures['p50_us']:6.0f} us  p99 {figures['p99_us']:6.0f} us  [{cpu}]"
        )
    print()
    base = results.get(BASELINE)
    for name, (cpu_target, ops_target) in TARGETS.items():
        if name not in results or base is None:
            continue
        cpu = results[name]["router_us_per_op"] / base["router_us_per_op"]
        paired = [
            r[name]["router_us_per_op"] / r[BASELINE]["router_us_per_op"] for r in rounds if name in r and BASELINE in r
        ]
        verdict = "ok" if cpu <= cpu_target else "MISSED"
        print(
            f"{name} / {BASELINE} CPU per request: {cpu:.2f}x (target <= {cpu_target}x) {verdict}; "
            f"within each round: {', '.join(f'{x:.2f}' for x in sorted(paired))}"
        )
        if ops_target is not None:
            ops = results[name]["ops_per_s"] / base["ops_per_s"]
            verdict = "ok" if ops >= ops_target else "MISSED"
            print(f"{name} / {BASELINE} ops/s: {ops:.2f}x (target >= {ops_target}x) {verdict}")
    if "twemproxy" in results and base is not None:
        ratio = results["twemproxy"]["router_us_per_op"] / base["router_us_per_op"]
        print(f"twemproxy / {BASELINE} CPU per request: {ratio:.2f}x")
    workers = results.get("gateway-w2")
    if workers is not None and "gateway-n1" in results:
        one = results["gateway-n1"]["router_us_per_op"]
        ratio = workers["workers_us_per_op"] / one
        verdict = "ok" if ratio <= WORKERS_CPU_TARGET else "MISSED"
        print(
            f"--workers 2: the workers' summed CPU per request / one gateway process's: {ratio:.2f}x (target <= "
            f"{WORKERS_CPU_TARGET}x) {verdict}; with the main process (Raft, health checks, stats): "
            f"{workers['router_us_per_op'] / one:.2f}x ({workers['main_us_per_op']:.1f} us/op of it)"
        )
    if workers is not None and workers.get("worker_connections"):
        counts = workers["worker_connections"]
        spread = (max(counts) - min(counts)) / max(counts) if max(counts) else 0.0
        verdict = "ok" if spread <= SPREAD_TARGET else "MISSED"
        print(f"connections per worker: {counts} ({spread:.0%} apart, target <= {SPREAD_TARGET:.0%}) {verdict}")
    projected: list[tuple[str, float]] = [
        (n, results[n]["router_us_per_op"]) for n in ("gateway-n1", "twemproxy") if n in results
    ]
    if workers is not None:
        projected.insert(0, ("gateway-w2", workers["workers_us_per_op"]))
    if projected:
        print("throughput per host projected from the CPU per request (every core routing, backends elsewhere;")
        print("gateway-w2: its workers' CPU per request, the main process's few percent of one core left out):")
        for name, per in projected:
            cells = ", ".join(f"{cores} cores {cores * 1e6 / per:12,.0f} ops/s" for cores in (4, 8, 16))
            print(f"  {name:12} {cells}")


class _HTTPPipe(_Pipe):
    """A ``_Pipe`` that an ``HTTPChannel`` can sit on."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def isSecure(self) -> bool:
        return False


def http_inprocess(requests_count: int) -> None:
    """HTTP GET /kv in process (no sockets, reactor not running): the gateway's site (N=1, its router over three
    kvstore servers by in-memory pipes, their share timed apart) beside the bare Klein route's, CPU time of
    this process per request, best of 3."""
    import random

    import klein_baseline
    from twisted.internet import reactor

    from chashd.gateway.api import RingRoot
    from chashd.gateway.router import Placement, Router
    from chashd.memcache.client import KVClientProtocol
    from chashd.ring import HashRing
    from chashd.web import KeyValueHTTP

    nodes = ["kv-a", "kv-b", "kv-c"]
    links = {
        node: _Link(KVClientProtocol(reactor, 4.0, 2 * 1024 * 1024), _kvstore_server(reactor, node)) for node in nodes
    }
    router = Router("bench", reactor, {n: link.client for n, link in links.items()}.__getitem__, 1, 1, 1)
    router.update(Placement(HashRing(dict.fromkeys(nodes, 1), epoch=1)))
    http = KeyValueHTTP(router, role="gateway")
    kv = http.resource()
    sites = {
        "gateway": (http.site(RingRoot(kv, kv, kv), reactor=reactor), list(links.values())),
        "klein": (klein_baseline.QuietSite(klein_baseline.app.resource()), []),  # type: ignore[no-untyped-call]  # twisted.web is not annotated
    }
    paths = [b"/kv/key:%05d" % i for i in range(10_000)]
    fill = [b"PUT %s HTTP/1.1\r\nHost: b\r\nContent-Length: 100\r\n\r\n%s" % (p, b"v" * 100) for p in paths]
    pick = random.Random(1)
    gets = [b"GET %s HTTP/1.1\r\nHost: b\r\n\r\n" % pick.choice(paths) for _ in range(requests_count)]
    print(f"HTTP GET /kv in process (no sockets), {requests_count:,} requests, 50 per round:")
    own = {}
    for name, (site, backends) in sites.items():
        _http_inprocess_run(site, backends, fill)
        total, backend = min(_http_inprocess_run(site, backends, gets) for _ in range(3))
        own[name] = _report(f"{name} GET /kv", (total, backend), len(gets))
    print(f"own work, gateway / Klein: {own['gateway'] / own['klein']:.2f}x")


def _http_inprocess_run(site: Any, links: list[_Link], mix: list[bytes]) -> tuple[float, float]:
    """Seconds for ``mix`` through 50 connections of ``site``, and the share of them spent in the backends."""
    from twisted.internet import reactor
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    connections = []
    for _ in range(50):
        channel, pipe = site.buildProtocol(None), _HTTPPipe()
        channel.makeConnection(pipe)
        connections.append((channel, pipe))
    for link in links:
        link.server_seconds = 0.0
    start = time.process_time()
    answered = 0
    for first in range(0, len(mix), 50):
        for (channel, _), request in zip(connections, mix[first : first + 50]):
            channel.dataReceived(request)
        while any([link.pump() for link in links]):
            pass
        reactor.runUntilCurrent()  # type: ignore[attr-defined]  # timers, as one reactor iteration runs them
        for _, pipe in connections:
            answered += pipe.take().startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 204 "))
    total = time.process_time() - start
    assert answered == len(mix), f"{len(mix) - answered} requests not answered with a 2xx"
    for channel, _ in connections:
        channel.connectionLost(Failure(ConnectionDone()))
    return total, sum(link.server_seconds for link in links)


def http_bench(args: argparse.Namespace, work: Path) -> None:
    """HTTP GET /kv through the gateway (N=1; kvstores on core 0, the gateway alone on core 1) against a bare
    Klein route over a dict on core 1, with wrk on core 0: requests/s and the router's CPU per request."""
    from kvstore import cpu_seconds
    from kvstore_http import KEYS, LUA, wrk

    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install -y wrk): skipping --http")
        return
    script = work / "keys.lua"
    script.write_text(LUA)
    fastest: dict[str, float] = {}  # the most requests/s of each
    cheapest: dict[str, float] = {}  # the least CPU per request of each
    paired: list[tuple[float, float]] = []  # each round's requests/s and CPU per request, gateway / Klein
    for round_number in range(1, args.rounds + 1):
        this_round: dict[str, dict[str, Any]] = {}
        for name in ("gateway-http", "klein"):
            processes = Processes(work)
            cluster: LocalCluster | None = None
            try:
                if name == "klein":
                    (port,) = free_ports(1)
                    command = [sys.executable, str(HERE / "klein_baseline.py"), str(port)]
                    pid = processes.start("klein", command, port, ROUTER_CORE).pid
                else:
                    cluster = LocalCluster(
                        work / f"http-{time.monotonic_ns()}",
                        gateways=1,
                        kvstores=3,
                        gateway_args=N1,
                        env=clean_environ(),
                    )
                    cluster.start(timeout=120)
                    settled(cluster)
                    for daemon in cluster.kvstores:
                        assert daemon.pid is not None
                        pin_pid(daemon.pid, BACKEND_CORE)
                    gateway = cluster.gateways[0]
                    assert gateway.pid is not None
                    pid, port = gateway.pid, gateway.http_port
                    pin_pid(pid, ROUTER_CORE)
                _fill(port, KEYS)
                wrk(port, 2, args.connections, script)
                before = cpu_seconds(pid)
                result = wrk(port, int(args.seconds), args.connections, script)
                used = cpu_seconds(pid) - before
            finally:
                if cluster is not None:
                    cluster.stop()
                processes.stop()
            result["us_per_request"] = 1e6 * used / (result["rate"] * int(args.seconds))
            print(
                f"round {round_number} {name:12s} {result['rate']:10,.0f} req/s  "
                f"router {result['us_per_request']:6.1f} us/request  p50 {result['p50']}  p99 {result['p99']}  "
                f"non-2xx {result['non2xx']}",
                flush=True,
            )
            this_round[name] = result
            fastest[name] = max(fastest.get(name, 0.0), result["rate"])
            cheapest[name] = min(cheapest.get(name, float("inf")), result["us_per_request"])
        ours, klein = this_round["gateway-http"], this_round["klein"]
        paired.append((ours["rate"] / klein["rate"], ours["us_per_request"] / klein["us_per_request"]))
    ratio = fastest["gateway-http"] / fastest["klein"]
    cpu = cheapest["gateway-http"] / cheapest["klein"]
    verdict = "ok" if ratio >= HTTP_TARGET else "MISSED"
    print(
        f"gateway GET /kv / bare Klein: {ratio:.2f}x requests/s, the best round of each (target >= {HTTP_TARGET}x) "
        f"{verdict}; {cpu:.2f}x CPU per request, the least of each"
    )
    print(
        "within each round: requests/s "
        + ", ".join(f"{r:.2f}x" for r, _ in paired)
        + "; CPU per request "
        + ", ".join(f"{c:.2f}x" for _, c in paired)
    )


def _fill(port: int, count: int) -> None:
    """PUT ``count`` keys of 100 bytes (key:00000 ...)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for i in range(count):
        connection.request("PUT", f"/kv/key:{i:05d}", body=b"v" * 100)
        response = connection.getresponse()
        response.read()
        assert response.status in (200, 201, 204), response.status
    connection.close()


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_load_options(parser)
    parser.add_argument("--targets", default=ALL_TARGETS)
    parser.add_argument("--rounds", type=int, default=3, help="runs of every target, interleaved; the best counts")
    parser.add_argument("--inprocess", action="store_true", help="only the in-process hot-path check")
    parser.add_argument("--inprocess-requests", type=int, default=100_000)
    parser.add_argument("--http", action="store_true", help="also HTTP GET /kv through the gateway against Klein")
    parser.add_argument("--inprocess-rmw", action="store_true", help="only the in-process incr check (N=3/W=2/R=2)")
    parser.add_argument("--failover-trials", type=int, default=0, help="also run bench/failover.py (0: no)")
    args = parser.parse_args()
    if args.inprocess_rmw:
        inprocess_rmw(args)
        return
    inprocess(args)
    if args.http:
        http_inprocess(args.inprocess_requests)
    if args.inprocess:
        return
    names = [n for n in args.targets.split(",") if n]
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
            f"{args.value_size}-byte values, {args.seconds:g}s after {args.warmup:g}s warm-up; generator and "
            f"backends on core {LOAD_CORE}, the router under test alone on core {ROUTER_CORE} (gateway-w2: its "
            f"processes on both); {args.rounds} round(s), interleaved"
        )
        print(
            f"{'target':16} {'round':>5} {'ops/s':>10} {'router us/op':>12} {'p50 us':>8} {'p99 us':>8} {'errors':>7}"
        )
        results: dict[str, dict[str, Any]] = {}
        rounds: list[dict[str, dict[str, Any]]] = []
        for round_number in range(1, args.rounds + 1):
            rounds.append({})
            for name in names:
                with started(name, work, nutcracker) as running:
                    figures = drive(loadgen, running, args, name)
                rounds[-1][name] = figures
                if name not in results or figures["router_us_per_op"] < results[name]["router_us_per_op"]:
                    results[name] = figures
                print(
                    f"{name:16} {round_number:5d} {figures['ops_per_s']:10,.0f} {figures['router_us_per_op']:12.1f} "
                    f"{figures['p50_us']:8.0f} {figures['p99_us']:8.0f} {figures['errors']:7d}",
                    flush=True,
                )
        summary(results, rounds)
        if args.http:
            print("\nHTTP GET /kv (wrk, 50 connections, keys of 10,000):", flush=True)
            http_bench(args, work)
    if args.failover_trials > 0:
        import failover

        print(f"\nleader failover (bench/failover.py --trials {args.failover_trials}):", flush=True)
        failover.main(["--trials", str(args.failover_trials)])


if __name__ == "__main__":
    main()
