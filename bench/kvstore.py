"""kvstore benchmark: the line protocol of a real kvstore beside a Twisted baseline and memcached, in one run.

    python bench/kvstore.py [--seconds 10] [--warmup 3] [--rounds 2] [--servers memory,sqlite,baseline,memcached]
    python bench/kvstore.py --inprocess      # only the in-process hot-path check

Load: 50 connections, each with one request in flight, 90% get / 10% set, 32-byte keys drawn from
10,000 (all set first), 100-byte values, measured for ``--seconds`` after ``--warmup``. The generator is
bench/loadgen.c, built here with the system's C compiler (a Python generator would be the bottleneck);
it reports ops/s, p50/p99 latency and its own CPU. On a machine with two cores the generator runs on core 0
and the server on core 1 (taskset).

Servers, one after the other: ``twistd -n chash-kvstore`` with the memory engine and with the SQLite
engine (real daemons), bench/baseline_server.py (a minimal Twisted get/set server over a dict), and
``memcached -t 1``, in ``--rounds`` interleaved rounds so that a burst of other load on the machine hits
every server alike; the best round of each counts. Printed: each run's figures, and the ratios kvstore /
baseline and kvstore / memcached against the targets (memory >= 0.8x baseline, SQLite >= 0.5x baseline).

``--inprocess`` measures the hot path without sockets: the same request mix fed to the server protocol
over LocalBackend and MemoryEngine (and to the baseline protocol), one request per ``dataReceived`` and 50
per call, so its cost per request is visible apart from the reactor's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline_server import BaselineFactory

from chashd.kvstore.backend import LocalBackend
from chashd.launcher import clean_environ, free_ports, twistd_command
from chashd.memcache.server import MemcacheServerFactory
from chashd.storage.memory import MemoryEngine

HERE = Path(__file__).resolve().parent
TARGETS = {"memory": 0.8, "sqlite": 0.5}


# -- processes ---------------------------------------------------------------------------------------


def pinned(command: list[str], core: int | None) -> list[str]:
    """``command`` run on one core when taskset is there and the machine has more than one."""
    if core is None or shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        return command
    return ["taskset", "-c", str(core), *command]


def build_loadgen(directory: Path) -> Path:
    """Compile bench/loadgen.c; fails with a clear message without a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("bench/kvstore.py needs a C compiler (cc or gcc) to build bench/loadgen.c")
    binary = directory / "loadgen"
    subprocess.run([compiler, "-O2", "-o", str(binary), str(HERE / "loadgen.c")], check=True)
    return binary


def wait_port(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections; fail if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on port {port} after {timeout}s:\n{log.read_text()[-2000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s; by the process's own pid."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def server_commands(name: str, port: int, work: Path) -> list[str]:
    """The command line that serves the line protocol on ``port`` for the server called ``name``."""
    if name in ("memory", "sqlite"):
        (http_port,) = free_ports(1)
        args = [
            "--node-id",
            f"bench-{name}",
            "--port",
            f"tcp:{http_port}:interface=127.0.0.1",
            "--line-port",
            f"tcp:{port}:interface=127.0.0.1",
            "--idle-timeout",
            "0",
        ]
        if name == "memory":
            args += ["--engine", "memory"]
        else:
            data = work / "sqlite-data"
            data.mkdir(exist_ok=True)
            args += ["--data-dir", str(data)]
        return twistd_command("chash-kvstore", args)
    if name == "baseline":
        return [sys.executable, str(HERE / "baseline_server.py"), str(port)]
    if name == "memcached":
        binary = shutil.which("memcached")
        if binary is None:
            raise SystemExit("memcached is not installed (apt-get install -y memcached)")
        command = [binary, "-U", "0", "-t", "1", "-l", "127.0.0.1", "-p", str(port), "-m", "256", "-c", "4096"]
        return command + (["-u", "nobody"] if os.geteuid() == 0 else [])
    raise SystemExit(f"unknown server {name!r}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drive(loadgen: Path, port: int, core: int, pids: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    """Run the generator on ``core`` against ``port``: its figures (JSON), plus ``server_cpu`` (each of
    ``pids``' share of a core, %) and ``cpu_us_per_op`` (their CPU per request), sampled from /proc after the
    preload and the warm-up until just before the end. Raises ``RuntimeError`` if the generator fails."""
    command = [str(loadgen), "127.0.0.1", str(port), str(args.connections), str(args.seconds),
               str(args.warmup), str(args.keys), str(args.get_percent), str(args.value_size), "1"]  # fmt: skip
    if getattr(args, "multi", 1) > 1:  # keys per get (bench/multiget.py)
        command.append(str(args.multi))
    with subprocess.Popen(pinned(command, core), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as gen:
        time.sleep(args.warmup + 1.0)
        before = {n: cpu_seconds(pid) for n, pid in pids.items()}
        t0 = time.monotonic()
        time.sleep(max(0.5, args.seconds - 1.5))
        after = {n: cpu_seconds(pid) for n, pid in pids.items()}
        elapsed = time.monotonic() - t0
        try:
            report, err = gen.communicate(timeout=args.seconds * 5 + 120)
        except subprocess.TimeoutExpired:
            gen.kill()
            raise RuntimeError("the load generator did not finish") from None
    if gen.returncode != 0:
        raise RuntimeError(f"the load generator failed: {err}")
    figures: dict[str, Any] = json.loads(report)
    figures["server_cpu"] = {n: 100.0 * (after[n] - before[n]) / elapsed for n in pids}
    # Server CPU per request: what the ops/s would be worth if the servers had their core to themselves.
    used = sum(after[n] - before[n] for n in pids) / elapsed
    figures["cpu_us_per_op"] = 1e6 * used / figures["ops_per_s"] if figures["ops_per_s"] else float("inf")
    return figures


def measure(
    name: str, loadgen: Path, args: argparse.Namespace, work: Path, extra_args: Sequence[str] = ()
) -> dict[str, Any]:
    """Start one server on core 1 (``extra_args`` appended to a kvstore's options), drive it from core 0,
    stop it; the generator's figures and the server's CPU per request (``cpu_us_per_op``, from /proc over
    the measured window)."""
    (port,) = free_ports(1)
    log = work / f"{name}.log"
    env = clean_environ()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            pinned(server_commands(name, port, work) + list(extra_args), 1),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_port(port, process, log)
        try:
            figures = drive(loadgen, port, 0, {name: process.pid}, args)
        except RuntimeError as e:
            raise SystemExit(f"{name}: {e}\n{log.read_text()[-2000:]}") from None
        figures["server_cpu"] = figures["server_cpu"][name]
        return figures
    finally:
        stop(process)


# -- in process ------------------------------------------------------------------------------------------


class _Sink:
    """A transport that throws replies away (and counts their bytes)."""

    def __init__(self) -> None:
        self.written = 0
        self.disconnecting = False

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writeSequence(self, data: list[bytes]) -> None:
        for chunk in data:
            self.write(chunk)

    def loseConnection(self) -> None:
        self.disconnecting = True

    def getPeer(self) -> None:
        return None

    def getHost(self) -> None:
        return None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass


def requests(count: int, keys: int, get_percent: int, value_size: int, seed: int = 1) -> list[bytes]:
    """The benchmark's request mix as bytes, one request each."""
    rng = random.Random(seed)
    value = b"v" * value_size
    out = []
    for _ in range(count):
        key = b"key:%028d" % rng.randrange(keys)
        if rng.randrange(100) < get_percent:
            out.append(b"get " + key + b"\r\n")
        else:
            out.append(b"set %s 0 0 %d\r\n%s\r\n" % (key, value_size, value))
    return out


def inprocess_rate(make_protocol: Callable[[], Any], mix: list[bytes], batch: int) -> float:
    """Requests per second through ``dataReceived`` with ``batch`` requests per call (best of 3)."""
    chunks = [b"".join(mix[i : i + batch]) for i in range(0, len(mix), batch)]
    best = 0.0
    for _ in range(3):
        protocol = make_protocol()
        protocol.makeConnection(_Sink())
        data_received = protocol.dataReceived
        start = time.perf_counter()
        for chunk in chunks:
            data_received(chunk)
        best = max(best, len(mix) / (time.perf_counter() - start))
    return best


def inprocess(args: argparse.Namespace) -> None:
    """The hot path's cost without sockets: kvstore protocol + LocalBackend + MemoryEngine vs the baseline."""
    from twisted.internet import reactor

    engine = MemoryEngine()
    backend = LocalBackend(engine, "bench", reactor, 1024 * 1024)
    factory = MemcacheServerFactory(backend, reactor, idle_timeout=0)
    baseline = BaselineFactory()
    preload = requests(args.keys, args.keys, 0, args.value_size)
    inprocess_rate(lambda: factory.buildProtocol(None), preload, 100)
    inprocess_rate(lambda: baseline.buildProtocol(None), preload, 100)
    mix = requests(200_000, args.keys, args.get_percent, args.value_size)
    print("in process (no sockets), requests/s through dataReceived:")
    print(f"{'':28} {'1 per call':>12} {'50 per call':>12}")
    rates = {}
    for name, make in (("kvstore (memory engine)", lambda: factory.buildProtocol(None)),
                       ("baseline (LineReceiver+dict)", lambda: baseline.buildProtocol(None))):  # fmt: skip
        rates[name] = (inprocess_rate(make, mix, 1), inprocess_rate(make, mix, 50))
        print(f"{name:28} {rates[name][0]:12,.0f} {rates[name][1]:12,.0f}")
    kv, base = rates["kvstore (memory engine)"], rates["baseline (LineReceiver+dict)"]
    print(f"{'ratio kvstore / baseline':28} {kv[0] / base[0]:12.2f} {kv[1] / base[1]:12.2f}")
    print(f"cost per request: kvstore {1e6 / kv[0]:.2f} us, baseline {1e6 / base[0]:.2f} us (1 per call)")


# -- main ------------------------------------------------------------------------------------------------


def add_load_options(parser: argparse.ArgumentParser) -> None:
    """The load generator's options, which ``drive`` reads (bench/gateway.py takes the same)."""
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--get-percent", type=int, default=90)
    parser.add_argument("--value-size", type=int, default=100)


def load_parser(doc: str | None, rounds: int) -> argparse.ArgumentParser:
    """The options every load benchmark takes: the load's (``add_load_options``), ``--rounds`` (runs of each
    server, interleaved; the best counts) and ``--inprocess`` (only the in-process check)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    add_load_options(parser)
    parser.add_argument("--rounds", type=int, default=rounds, help="runs of each, interleaved; the best counts")
    parser.add_argument("--inprocess", action="store_true", help="only the in-process check")
    return parser


def main() -> None:
    """Run the benchmark and print its table."""
    parser = load_parser(__doc__, rounds=2)
    parser.add_argument("--servers", default="memory,sqlite,baseline,memcached")
    args = parser.parse_args()
    inprocess(args)
    if args.inprocess:
        return
    with tempfile.TemporaryDirectory(prefix="chashd-bench-") as tmp:
        work = Path(tmp)
        loadgen = build_loadgen(work)
        results: dict[str, dict[str, Any]] = {}
        rounds: list[dict[str, float]] = []
        print(
            f"\nload: {args.connections} connections, {args.get_percent}% get, {args.keys} keys of 32 bytes, "
            f"{args.value_size}-byte values, {args.seconds:g}s after {args.warmup:g}s warm-up; "
            f"generator on core 0, server on core 1; {args.rounds} round(s), servers interleaved"
        )
        print(
            f"{'server':12} {'round':>5} {'ops/s':>10} {'p50 us':>8} {'p99 us':>8} {'gen CPU':>8} {'errors':>7} "
            f"{'server CPU':>10} {'us/op':>6}"
        )
        cpu_per_op: dict[str, list[float]] = {}
        for round_number in range(1, args.rounds + 1):
            rounds.append({})
            for name in args.servers.split(","):
                figures = measure(name, loadgen, args, work)
                rounds[-1][name] = figures["ops_per_s"]
                cpu_per_op.setdefault(name, []).append(figures["cpu_us_per_op"])
                if name not in results or figures["ops_per_s"] > results[name]["ops_per_s"]:
                    results[name] = figures
                print(
                    f"{name:12} {round_number:5d} {figures['ops_per_s']:10,.0f} {figures['p50_us']:8.0f} "
                    f"{figures['p99_us']:8.0f} {figures['cpu_percent']:7.0f}% {figures['errors']:7d} "
                    f"{figures['server_cpu']:9.0f}% {figures['cpu_us_per_op']:6.1f}",
                    flush=True,
                )
        print("\nbest round of each server:")
        for name, figures in results.items():
            print(
                f"{name:12} {figures['ops_per_s']:10,.0f} ops/s  p50 {figures['p50_us']:.0f} us  "
                f"p99 {figures['p99_us']:.0f} us  generator CPU {figures['cpu_percent']:.0f}%"
            )
        print()
        for name, target in TARGETS.items():
            if name not in results:
                continue
            ops = results[name]["ops_per_s"]
            if "baseline" in results:
                ratio = ops / results["baseline"]["ops_per_s"]
                verdict = "ok" if ratio >= target else "MISSED"
                paired = sorted(r[name] / r["baseline"] for r in rounds)
                print(
                    f"{name} / baseline: {ratio:.2f}x best of each (target >= {target}x) {verdict}; "
                    f"within each round: {', '.join(f'{x:.2f}' for x in paired)}, "
                    f"median {paired[len(paired) // 2]:.2f}x"
                )
                # Server CPU per request, the least noisy figure: the ops/s ratio if each had core 1 to itself.
                mine, base = sorted(cpu_per_op[name]), sorted(cpu_per_op["baseline"])
                cpu_ratio = base[len(base) // 2] / mine[len(mine) // 2]
                print(
                    f"{name} / baseline by server CPU per request (median of rounds): "
                    f"{base[len(base) // 2]:.1f} / {mine[len(mine) // 2]:.1f} us = {cpu_ratio:.2f}x"
                )
            if "memcached" in results:
                print(f"{name} / memcached: {ops / results['memcached']['ops_per_s']:.2f}x")
        if "baseline" in results and "memcached" in results:
            ratio = results["baseline"]["ops_per_s"] / results["memcached"]["ops_per_s"]
            print(f"baseline / memcached: {ratio:.2f}x")


if __name__ == "__main__":
    main()
