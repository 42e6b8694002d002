"""Anti-entropy benchmark: its cost after a fault heals, beside a handoff's, on the same cluster and reader.

    python bench/antientropy.py [--records 100000] [--value-size 256] [--missed 2000] [--rate 20000]
                                [--read-seconds 15] [--read-rate 200] [--workdir DIR]

Starts one real gateway (N=3, W=2, R=2, a probe every 0.5 s, down after 2 failures) and three real SQLite
kvstores (``--anti-entropy-interval 3600``: no pass but the ones a node coming back up starts, 2 s after it is
up; ``--anti-entropy-rate``) on loopback, loads ``--records`` records of ``--value-size`` bytes on every
kvstore (pipelined ``xput`` with the same versions), and reads random keys through the gateway (``--read-rate``
gets a second, one in flight, from a process of its own) throughout. Then:

1. quiet: ``--read-seconds`` of reads with no pass under way (the baseline p99);
2. a fault: kvstore-C paused (SIGSTOP) until the gateway marks it down, ``--missed`` new keys written through the
   gateway meanwhile (on A and B only), then SIGCONT; the gateway marks it up, and the passes start. Measured
   from the first pass under way to the last one over: the p99 of the reads, the records the kvstores scanned
   and compared, the CPU time (``/proc/<pid>/stat``) they used beyond their rate in the quiet window, per
   record compared, and the time from SIGCONT to every missed key on kvstore-C;
3. a handoff: a fourth, empty kvstore joins; measured while any handoff is under way: the p99 of the reads.

Prints the figures and the ratios of each p99 to the quiet one; the target is anti-entropy's ratio at most the
handoff's. Every process is stopped by its pid at the end, also on failure.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from handoff import LineClient, Reader, cpu_seconds, key, p99

from chashd.launcher import Daemon, LocalCluster, clean_environ, http_json

#: Seconds between two looks at the kvstores' /stats, in the quiet window as during the passes.
POLL = 0.2


def load(port: int, records: int, value_size: int, clock: int, token: str) -> None:
    """Write ``records`` records through pipelined xput, versions ``clock + i``, on a connection that proved
    the cluster ``token`` (a kvstore given one refuses xput before ``xauth``)."""
    client = LineClient(port)
    client.sock.sendall(b"xauth %s\r\n" % token.encode())
    client.read_count(b"OK\r\n", 1)
    value = os.urandom(value_size // 2).hex().encode()[:value_size].ljust(value_size, b"x")
    batch = 1000
    for first in range(0, records, batch):
        last = min(records, first + batch)
        client.sock.sendall(
            b"".join(
                b"xput %s 0 0 %d-bench 0 %d\r\n%s\r\n" % (key(i), clock + i, value_size, value)
                for i in range(first, last)
            )
        )
        for _ in range(last - first):  # EXISTS: anti-entropy brought it from a kvstore loaded before
            reply = client.read_until(b"\r\n")
            if reply not in (b"STORED\r\n", b"EXISTS\r\n"):
                raise RuntimeError(f"unexpected reply {reply[:100]!r}")
    client.close()


def stats(daemon: Daemon) -> dict[str, Any]:
    status, body = http_json(daemon.url + "/stats", timeout=5)
    if status != 200 or not isinstance(body, dict):
        raise RuntimeError(f"{daemon.name} answered /stats with {status}")
    return body


def total(daemons: list[Daemon], name: str) -> float:
    return sum(float(stats(d).get(name, 0)) for d in daemons)


def node_state(cluster: LocalCluster, name: str) -> str:
    return next(str(n["state"]) for n in cluster.status(0)["nodes"] if n["id"] == name)


def wait(what: str, check: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def missing_on(port: int, keys: list[bytes], token: str) -> int:
    """How many of ``keys`` a kvstore does not hold (xget on its line port, after ``xauth``)."""
    client = LineClient(port)
    client.sock.sendall(b"xauth %s\r\n" % token.encode())
    client.read_count(b"OK\r\n", 1)
    missing = 0
    for first in range(0, len(keys), 200):
        chunk = keys[first : first + 200]
        client.sock.sendall(b"xget " + b" ".join(chunk) + b"\r\n")
        reply = client.read_until(b"END\r\n")
        missing += len(chunk) - reply.count(b"XVALUE ")
    client.close()
    return missing


def run(args: argparse.Namespace, workdir: Path) -> int:
    env = clean_environ()
    cluster = LocalCluster(
        workdir,
        gateways=1,
        kvstores=3,
        engine="sqlite",
        gateway_args=["--probe-interval", "0.5", "--down-after", "2", "--dead-after", "3600"],
        kvstore_args=["--anti-entropy-interval", "3600", "--anti-entropy-rate", str(args.rate)],
        env=env,
    )
    with cluster:
        kvstores = list(cluster.kvstores)
        clock = int(time.time() * 1000) << 16
        print(f"loading {args.records:,} records of {args.value_size} bytes on each kvstore ...", flush=True)
        for daemon in kvstores:
            load(cluster.line_ports[daemon.name], args.records, args.value_size, clock, cluster.token)
        wait("no anti-entropy pass under way", lambda: total(kvstores, "antientropy_running") == 0)
        pids = {d.name: d.pid for d in kvstores}
        assert all(pid is not None for pid in pids.values())
        reader = Reader(cluster.line_ports["gateway-1"], args.records, args.read_rate)
        reader.start()

        # 1. quiet
        time.sleep(1.0)
        quiet_start = time.monotonic()
        cpu_quiet = {n: cpu_seconds(p) for n, p in pids.items()}  # type: ignore[arg-type]
        passes_before = total(kvstores, "antientropy_passes_total")
        while time.monotonic() < quiet_start + args.read_seconds:  # the same polling as during the passes
            total(kvstores, "antientropy_running")
            time.sleep(POLL)
        quiet_end = time.monotonic()
        cpu_quiet = {n: cpu_seconds(p) - cpu_quiet[n] for n, p in pids.items()}  # type: ignore[arg-type]
        if total(kvstores, "antientropy_passes_total") != passes_before:
            print("a pass ran in the quiet window; run again", file=sys.stderr)
            return 1

        # 2. a fault, healed
        victim = kvstores[2]
        victim.signal(signal.SIGSTOP)
        try:
            wait(f"{victim.name} marked down", lambda: node_state(cluster, victim.name) == "down")
            missed = [b"missed-%06d" % i for i in range(args.missed)]
            client = LineClient(cluster.line_ports["gateway-1"])
            for first in range(0, len(missed), 100):
                chunk = missed[first : first + 100]
                client.sock.sendall(b"".join(b"set %s 0 0 1\r\nm\r\n" % k for k in chunk))
                client.read_count(b"STORED\r\n", len(chunk))
            client.close()
        finally:
            victim.signal(signal.SIGCONT)
        healed = time.monotonic()
        compared_before = total(kvstores, "antientropy_keys_compared_total")
        scanned_before = total(kvstores, "antientropy_keys_scanned_total")
        repaired_before = total(kvstores, "antientropy_keys_repaired_total")
        cpu_before = {n: cpu_seconds(p) for n, p in pids.items()}  # type: ignore[arg-type]
        wait("the passes to start", lambda: total(kvstores, "antientropy_running") > 0, timeout=60)
        pass_start = time.monotonic()
        victim_port = cluster.line_ports[victim.name]
        replicated = None
        while time.monotonic() < pass_start + 600:
            now = time.monotonic()
            repairs = total(kvstores, "antientropy_keys_repaired_total") - repaired_before
            if replicated is None and repairs >= len(missed) and missing_on(victim_port, missed, cluster.token) == 0:
                replicated = now
            if total(kvstores, "antientropy_running") == 0:
                break
            time.sleep(POLL)
        pass_end = time.monotonic()
        cpu_pass = {n: cpu_seconds(p) - cpu_before[n] for n, p in pids.items()}  # type: ignore[arg-type]
        if replicated is None:
            replicated = pass_end if missing_on(victim_port, missed, cluster.token) == 0 else None
        compared = total(kvstores, "antientropy_keys_compared_total") - compared_before
        scanned = total(kvstores, "antientropy_keys_scanned_total") - scanned_before
        repaired = total(kvstores, "antientropy_keys_repaired_total") - repaired_before

        # 3. a handoff
        fourth = cluster.add_kvstore(wait=False)
        fourth.wait_healthy(60)

        def handoffs_running() -> bool:
            return any(bool((d.health(timeout=5) or {}).get("handoff", {}).get("running")) for d in cluster.kvstores)

        wait("a handoff under way", handoffs_running, timeout=60)
        handoff_start = time.monotonic()
        wait("every handoff over", lambda: not handoffs_running(), timeout=600)
        handoff_end = time.monotonic()
        reader.finish()

    quiet = [latency for latency, _ in reader.window(quiet_start, quiet_end)]
    during = [latency for latency, _ in reader.window(pass_start, pass_end)]
    moving = [latency for latency, _ in reader.window(handoff_start, handoff_end)]
    seconds = pass_end - pass_start
    quiet_seconds = quiet_end - quiet_start
    extra_cpu = sum(cpu_pass[n] - cpu_quiet[n] * (pass_end - healed) / quiet_seconds for n in cpu_pass)
    p99_quiet, p99_pass = p99(quiet), p99(during) if during else float("nan")
    p99_move = p99(moving) if moving else float("nan")
    ae_ratio, move_ratio = p99_pass / p99_quiet, p99_move / p99_quiet
    print()
    print(f"{args.records:,} records of {args.value_size} bytes on 3 kvstores (N=3), rate {args.rate:,} records/s")
    print(f"reads p99 quiet         {1000 * p99_quiet:.2f} ms ({len(quiet):,} reads)")
    print(
        f"anti-entropy passes     {seconds:.1f} s after kvstore-C came back: {compared:,.0f} records compared, "
        f"{scanned:,.0f} scanned, {repaired:,.0f} repaired"
    )
    if replicated is not None:
        print(f"heal to full replication  {replicated - healed:.1f} s (all {len(missed):,} missed keys on kvstore-C)")
    else:
        print("heal to full replication  NOT reached: kvstore-C lacks keys after the passes")
    print(
        f"CPU beyond the quiet rate {extra_cpu:.2f} s in all: {1e6 * extra_cpu / max(1.0, compared):.1f} us per record "
        f"compared, {1e6 * extra_cpu / max(1.0, scanned):.1f} us per record scanned "
        f"({', '.join(f'{n} {c:.2f} s' for n, c in cpu_pass.items())})"
    )
    print(f"reads p99 during passes {1000 * p99_pass:.2f} ms ({len(during):,} reads): {ae_ratio:.2f}x quiet")
    moved = handoff_end - handoff_start
    print(
        f"reads p99 during handoff {1000 * p99_move:.2f} ms ({len(moving):,} reads, {moved:.1f} s): "
        f"{move_ratio:.2f}x quiet"
    )
    met = ae_ratio <= move_ratio and replicated is not None
    print(f"anti-entropy's p99 ratio <= the handoff's: {'met' if met else 'NOT met'}")
    print(f"load average {os.getloadavg()[0]:.2f}; logs in {workdir}")
    return 0 if met else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--value-size", type=int, default=256)
    parser.add_argument("--missed", type=int, default=2000, help="keys written while kvstore-C is down")
    parser.add_argument("--rate", type=int, default=20_000, help="the kvstores' --anti-entropy-rate")
    parser.add_argument("--read-seconds", type=float, default=15.0, help="reads with no pass under way")
    parser.add_argument("--read-rate", type=float, default=200.0, help="gets a second of the reader")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chashd-ae-"))
    return run(args, workdir)


if __name__ == "__main__":
    sys.exit(main())
