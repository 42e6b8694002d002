"""Handoff benchmark: a kvstore holding 200,000 records of 1 KiB joins a second, empty one (N=1, half move).

    python bench/handoff.py [--records 200000] [--value-size 1024] [--read-seconds 10] [--handoff-rate R]
                            [--workdir DIR]
    python bench/handoff.py --records 1000000 --value-size 100     # the issue's second case

Starts one real gateway (``--replicas 1``) and one real kvstore with the SQLite engine on loopback
(``LocalCluster``), loads the kvstore through its line port (``xauth`` with the cluster's token, then pipelined
``xput``, 1,000 in flight), then:

- reads through the gateway's line port for ``--read-seconds`` with no move (one connection, ``--read-rate``
  gets of random keys a second, one in flight, from a process of its own: the p99 without a move);
- starts a second, empty SQLite kvstore; it registers, the ring changes, the first kvstore pushes about
  half its records to it. The move runs from the first ``/health`` (polled every 50 ms) showing the first
  kvstore's handoff under way to the one showing every page of its main pass acknowledged (``phase``
  ``drop`` or ``sweep``: the second kvstore has every record), or, when none shows that (code that drops
  each page as it goes, or deferred drops over within a poll), to the one showing it over and both kvstores
  synced with the gateway's epoch; the records moved are the first kvstore's ``records_sent``, MB/s counts
  their value bytes. The deferred drops (from the end of the move to both kvstores synced) are printed
  apart: their time, each daemon's CPU over them and the reads' p99 during them;
- also reads each kvstore directly on its line port (one connection each), to tell the kvstores' share
  of the gateway's latency from the gateway's own;
- takes the CPU time (user + system, ``/proc/<pid>/stat``) each daemon used during the move, per record
  moved, and the part of it spent in the kernel: on a loaded machine the rate follows the CPU the move needs;
  and each kvstore's main thread's (its reactor's, ``/proc/<pid>/task/<pid>/stat``) against its other threads'
  (the thread pool's: scans, encoding, drops, checkpoints);
- samples both kvstores' RSS (``/proc/<pid>/status`` VmRSS, every 50 ms) before and during the move, and
  keeps reading through the gateway meanwhile (the p99 during the move; a read that misses is counted);
- reads each kvstore's full garbage collections (``gc_full_*`` in ``/stats``, timed with ``gc.callbacks``)
  before and after the move (the second kvstore's once it is up, after its start-up collection): how many
  ran during it, their total and the longest pause;
- the baseline, in the same run just before the move: the same number of rows (half the records) copied
  between two SQLite files in this process (pages of 500 read in ring order from the first kvstore's file,
  each written into a new file of the same schema and settings in one ``executemany`` and commit), its rate
  and this process's CPU per row.

Prints the figures against the targets: >= 20,000 records/s and >= 0.5x the SQLite copy, RSS growth during
the move < 100 MB, p99 of gateway reads during the move <= 3x the p99 without. Every process is stopped by
its pid at the end.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from chashd.launcher import Daemon, LocalCluster, clean_environ, http_json

HOST = "127.0.0.1"
TARGET_RATE = 20_000
TARGET_RSS_MB = 100
TARGET_P99_RATIO = 3.0
TARGET_COPY_RATIO = 0.5


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process (all its threads) has used, in seconds."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU time a process (all its threads) has used, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan"), float("nan")
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def main_thread_cpu(pid: int) -> float:
    """User plus system CPU time the main thread of a process (a daemon's reactor thread) has used, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float | None:
    """The resident set of a process in MB (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class LineClient:
    """A blocking memcached-protocol connection."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def read_until(self, end: bytes) -> bytes:
        while end not in self.buffer:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.buffer += chunk
        index = self.buffer.index(end) + len(end)
        reply, self.buffer = self.buffer[:index], self.buffer[index:]
        return reply

    def read_count(self, line: bytes, count: int) -> None:
        """Read ``count`` replies, each exactly ``line``."""
        wanted = len(line) * count
        while len(self.buffer) < wanted:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.buffer += chunk
        replies, self.buffer = self.buffer[:wanted], self.buffer[wanted:]
        if replies != line * count:
            raise RuntimeError(f"unexpected replies: {replies[:200]!r}")

    def close(self) -> None:
        self.sock.close()


def key(i: int) -> bytes:
    return b"bench-%08d" % i


def load(port: int, records: int, value_size: int, token: str) -> float:
    """Write ``records`` records through pipelined xput, on a connection that proved the cluster ``token``;
    the rate in records/s."""
    client = LineClient(port)
    client.sock.sendall(b"xauth %s\r\n" % token.encode())
    client.read_count(b"OK\r\n", 1)
    value = os.urandom(value_size // 2).hex().encode()[:value_size].ljust(value_size, b"x")
    clock = int(time.time() * 1000) << 16
    started = time.monotonic()
    batch = 1000
    for first in range(0, records, batch):
        last = min(records, first + batch)
        client.sock.sendall(
            b"".join(
                b"xput %s 0 0 %d-bench 0 %d\r\n%s\r\n" % (key(i), clock + i, value_size, value)
                for i in range(first, last)
            )
        )
        client.read_count(b"STORED\r\n", last - first)
    client.close()
    return records / (time.monotonic() - started)


def _read_loop(port: int, records: int, rate: float, stop: Any, results: Any) -> None:
    """A reader process's body: ``rate`` gets of random keys a second, one at a time, until ``stop``; then
    sends back the samples ``(time, latency, hit)`` (``time.monotonic`` is one clock for every process)."""
    samples: list[tuple[float, float, bool]] = []
    try:
        client = LineClient(port)
        rng = random.Random(port)
        due = time.monotonic()
        while not stop.is_set():
            due += 1.0 / rate
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            else:
                due = time.monotonic()  # late (a slow reply): no burst to catch up
            request = b"get %s\r\n" % key(rng.randrange(records))
            started = time.monotonic()
            client.sock.sendall(request)
            reply = client.read_until(b"END\r\n")
            if not reply.startswith((b"VALUE", b"END")):
                raise RuntimeError(f"unexpected reply {reply[:100]!r}")
            samples.append((started, time.monotonic() - started, reply.startswith(b"VALUE")))
        client.close()
        results.put(samples)
    except BaseException as e:
        results.put(f"{type(e).__name__}: {e}")


class Reader:
    """Reads random keys on a line port, one at a time, in a process of its own (threads of this process
    would wait for each other's GIL and add that to the latencies)."""

    def __init__(self, port: int, records: int, rate: float) -> None:
        self._stop = multiprocessing.Event()
        self._results: Any = multiprocessing.Queue()
        self._process = multiprocessing.Process(
            target=_read_loop, args=(port, records, rate, self._stop, self._results), daemon=True
        )
        self.samples: list[tuple[float, float, bool]] = []

    def start(self) -> None:
        self._process.start()

    def finish(self) -> None:
        """Stop reading and collect the samples; raises if the reader failed."""
        self._stop.set()
        result = self._results.get(timeout=60)
        self._process.join(10)
        if isinstance(result, str):
            raise RuntimeError(f"a reader failed: {result}")
        self.samples = result

    def window(self, start: float, end: float) -> list[tuple[float, bool]]:
        return [(latency, hit) for t, latency, hit in self.samples if start <= t <= end]


class RSSSampler(threading.Thread):
    """Samples the RSS of some processes every 50 ms; keeps (time, pid, MB)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.pids: list[int] = []
        self.samples: list[tuple[float, int, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            now = time.monotonic()
            for pid in list(self.pids):
                value = rss_mb(pid)
                if value is not None:
                    self.samples.append((now, pid, value))

    def series(self, pid: int, start: float, end: float) -> list[float]:
        return [mb for t, p, mb in list(self.samples) if p == pid and start <= t <= end]


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def sqlite_copy(source: Path, target: Path, rows: int, page: int = 500) -> tuple[float, float]:
    """Copy the first ``rows`` rows of a kvstore's SQLite file into a new file of the same schema and settings,
    a page of ``page`` rows at a time (one SELECT, one executemany and one commit per page): (rows/s, CPU
    seconds per row of this process)."""
    reader = sqlite3.connect(f"file:{source}?mode=ro", uri=True, isolation_level=None)
    schema = reader.execute("SELECT sql FROM sqlite_master WHERE name = 'records'").fetchone()[0]
    page_size = reader.execute("PRAGMA page_size").fetchone()[0]
    writer = sqlite3.connect(target, isolation_level=None)
    writer.execute(f"PRAGMA page_size = {int(page_size)}")
    writer.execute("PRAGMA journal_mode = WAL")
    writer.execute("PRAGMA synchronous = NORMAL")
    writer.execute(schema)
    started, cpu = time.monotonic(), time.process_time()
    copied = 0
    position = (-1, b"")
    while copied < rows:
        found = reader.execute(
            "SELECT * FROM records WHERE (hash, key) > (?, ?) ORDER BY hash, key LIMIT ?",
            (*position, min(page, rows - copied)),
        ).fetchall()
        if not found:
            break
        writer.execute("BEGIN IMMEDIATE")
        writer.executemany(f"INSERT INTO records VALUES ({', '.join('?' * len(found[0]))})", found)
        writer.execute("COMMIT")
        copied += len(found)
        position = (found[-1][0], found[-1][1])
    elapsed, used = time.monotonic() - started, time.process_time() - cpu
    reader.close()
    writer.close()
    return copied / elapsed, used / max(1, copied)


def gc_figures(daemon: Daemon) -> dict[str, float]:
    """A kvstore's ``gc_full_*`` figures from ``/stats``."""
    body = http_json(daemon.url + "/stats", timeout=5)[1] or {}
    return {name: float(value) for name, value in body.items() if name.startswith("gc_full_")}


def handoff(daemon: Daemon) -> dict[str, Any]:
    body = daemon.health(timeout=5)
    if body is None:
        raise RuntimeError(f"{daemon.name} does not answer /health")
    return dict(body["handoff"])


def run(args: argparse.Namespace, workdir: Path) -> int:
    env = clean_environ()
    cluster = LocalCluster(
        workdir,
        gateways=1,
        kvstores=1,
        engine="sqlite",
        gateway_args=["--replicas", "1", "--write-quorum", "1", "--read-quorum", "1"],
        kvstore_args=["--handoff-rate", args.handoff_rate],
        env=env,
    )
    sampler = RSSSampler()
    with cluster:
        first = cluster.kvstores[0]
        assert first.pid is not None
        print(f"loading {args.records:,} records of {args.value_size} bytes into {first.name} ...", flush=True)
        rate = load(cluster.line_ports[first.name], args.records, args.value_size, cluster.token)
        keys = first.health(timeout=5)["keys"]  # type: ignore[index]
        print(f"loaded at {rate:,.0f} records/s; {first.name} holds {keys:,} records", flush=True)

        sampler.pids.append(first.pid)
        sampler.start()
        reader = Reader(cluster.line_ports["gateway-1"], args.records, args.read_rate)
        reader.start()
        direct = {first.name: Reader(cluster.line_ports[first.name], args.records, args.read_rate)}
        direct[first.name].start()
        time.sleep(args.read_seconds)
        quiet_end = time.monotonic()

        copy_rate, copy_cpu = sqlite_copy(
            workdir / first.name / "kvstore.db", workdir / "copy-baseline.db", args.records // 2
        )
        (workdir / "copy-baseline.db").unlink()
        gc_before = {first.name: gc_figures(first)}

        second = cluster.add_kvstore(wait=False)
        while second.pid is None:
            time.sleep(0.01)
        sampler.pids.append(second.pid)
        second.wait_healthy(60)
        direct[second.name] = Reader(cluster.line_ports[second.name], args.records, args.read_rate)
        direct[second.name].start()
        second_base = rss_mb(second.pid) or 0.0
        gc_before[second.name] = gc_figures(second)  # after its start-up collection (the freeze's)
        first_base = statistics.median(sampler.series(first.pid, quiet_end - args.read_seconds, quiet_end))
        start = end = delivered = None
        gateway_pid = cluster.gateways[0].pid
        assert gateway_pid is not None
        pids = {first.name: first.pid, second.name: second.pid, "gateway-1": gateway_pid}
        cpu_before = {name: cpu_split(pid) for name, pid in pids.items()}
        reactor_before = {name: main_thread_cpu(pid) for name, pid in pids.items()}
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            now = time.monotonic()
            state = handoff(first)
            if start is None and (state["running"] or state["records_sent"]):
                start = now
                cpu_before = {name: cpu_split(pid) for name, pid in pids.items()}
                reactor_before = {name: main_thread_cpu(pid) for name, pid in pids.items()}
            if start is not None and delivered is None and state.get("phase") in ("drop", "sweep"):
                delivered = now  # every page of the main pass acknowledged: its drops were deferred to now
                cpu_delivered = {name: cpu_split(pid) for name, pid in pids.items()}
                reactor_delivered = {name: main_thread_cpu(pid) for name, pid in pids.items()}
            if start is not None and not state["running"]:
                epoch = http_json(cluster.gateways[0].url + "/ring/status")[1]["epoch"]
                if state["synced_epoch"] == epoch and handoff(second)["synced_epoch"] == epoch:
                    end = now
                    cpu_end = {name: cpu_split(pid) for name, pid in pids.items()}
                    if delivered is None:  # no deferred drops (or over within a poll): the move is the whole handoff
                        delivered, cpu_delivered = end, cpu_end
                        reactor_delivered = {name: main_thread_cpu(pid) for name, pid in pids.items()}
                    cpu_used = {
                        name: tuple(a - b for a, b in zip(cpu_delivered[name], cpu_before[name]))
                        for name, pid in pids.items()
                    }
                    cpu_drops = {
                        name: tuple(a - b for a, b in zip(cpu_end[name], cpu_delivered[name]))
                        for name, pid in pids.items()
                    }
                    reactor_used = {name: reactor_delivered[name] - reactor_before[name] for name in pids}
                    break
            time.sleep(0.05)
        if start is None or end is None or delivered is None:
            print("the move did not finish in time", file=sys.stderr)
            return 1
        moved_state = handoff(first)
        received = handoff(second)["records_received"]
        gc_after = {first.name: gc_figures(first), second.name: gc_figures(second)}
        for one in [reader, *direct.values()]:
            one.finish()
        quiet = reader.window(quiet_end - args.read_seconds, quiet_end)
        during = reader.window(start, delivered)
        dropping = reader.window(delivered, end)
        sampler.stop.set()
        sampler.join(5)

        moved = moved_state["records_sent"]
        elapsed = delivered - start
        first_peak = max(sampler.series(first.pid, start, end) or [first_base])
        second_peak = max(sampler.series(second.pid, start, end) or [second_base])
        p99_quiet = p99([latency for latency, _ in quiet])
        p99_move = p99([latency for latency, _ in during]) if during else float("nan")
        misses = sum(1 for _, hit in [*during, *dropping, *quiet] if not hit)
        growth = max(first_peak - first_base, second_peak - second_base)
        ratio = p99_move / p99_quiet

        def verdict(ok: bool) -> str:
            return "met" if ok else "missed"

        print()
        window = f"monotonic {start:.1f}-{delivered:.1f}"
        print(f"records moved      {moved:,} (received {received:,}) in {elapsed:.2f} s ({window})")
        if end > delivered:
            print(
                f"deferred drops     {moved_state['records_dropped']:,} records dropped in {end - delivered:.2f} s "
                f"more (to {end:.1f}); the whole handoff {moved / (end - start):,.0f} records/s"
            )
        print(
            f"rate               {moved / elapsed:,.0f} records/s, "
            f"{moved * args.value_size / elapsed / 1e6:.1f} MB/s of values   "
            f"target >= {TARGET_RATE:,}: {verdict(moved / elapsed >= TARGET_RATE)}"
        )
        copy_ratio = moved / elapsed / copy_rate
        print(
            f"SQLite copy        {copy_rate:,.0f} rows/s between two files in one process "
            f"({1e6 * copy_cpu:.0f} us CPU/row): the move is {copy_ratio:.2f}x that   "
            f"target >= {TARGET_COPY_RATIO:g}x: {verdict(copy_ratio >= TARGET_COPY_RATIO)}"
        )
        print(
            f"RSS {first.name:10s}   {first_base:.0f} MB before, peak {first_peak:.0f} MB "
            f"(+{first_peak - first_base:.0f} MB)"
        )
        print(
            f"RSS {second.name:10s}   {second_base:.0f} MB once up, peak {second_peak:.0f} MB "
            f"(+{second_peak - second_base:.0f} MB)   target growth < {TARGET_RSS_MB} MB: "
            f"{verdict(growth < TARGET_RSS_MB)}"
        )
        print(
            f"gateway reads p99  {p99_quiet * 1000:.2f} ms without a move ({len(quiet):,} reads), "
            f"{p99_move * 1000:.2f} ms during it ({len(during):,} reads): {ratio:.2f}x   "
            f"target <= {TARGET_P99_RATIO:g}x: {verdict(ratio <= TARGET_P99_RATIO)}"
        )
        if end > delivered and dropping:
            p99_drops = p99([latency for latency, _ in dropping])
            print(
                f"gateway reads p99  {p99_drops * 1000:.2f} ms during the deferred drops ({len(dropping):,} reads): "
                f"{p99_drops / p99_quiet:.2f}x"
            )
        for name, one in direct.items():
            before = [latency for latency, _ in one.window(quiet_end - args.read_seconds, quiet_end)]
            moving = [latency for latency, _ in one.window(start, delivered)]
            line = f"direct reads {name:10s} p99 "
            if before:
                line += f"{p99(before) * 1000:.2f} ms without a move, "
            if moving:
                line += f"{p99(moving) * 1000:.2f} ms during it (p50 {statistics.median(moving) * 1000:.2f} ms)"
            later = [latency for latency, _ in one.window(delivered, end)] if end > delivered else []
            if later:
                line += f", {p99(later) * 1000:.2f} ms during the deferred drops"
            print(line)
        print(
            "CPU during the move "
            + ", ".join(
                f"{name} {user + system:.1f} s ({1e6 * (user + system) / max(1, moved):.0f} us/record, "
                f"{1e6 * system / max(1, moved):.0f} of them system)"
                for name, (user, system) in cpu_used.items()
            )
        )
        print(
            "reactor threads    "
            + ", ".join(
                f"{name} {reactor_used[name]:.2f} s ({1e6 * reactor_used[name] / max(1, moved):.1f} us/record; "
                f"its other threads {1e6 * (sum(cpu_used[name]) - reactor_used[name]) / max(1, moved):.1f})"
                for name in (first.name, second.name)
            )
        )
        if end > delivered:
            print(
                "CPU during the deferred drops "
                + ", ".join(
                    f"{name} {user + system:.1f} s ({1e6 * (user + system) / max(1, moved):.0f} us/record moved, "
                    f"{1e6 * system / max(1, moved):.0f} of them system)"
                    for name, (user, system) in cpu_drops.items()
                )
            )
        for name, figures in gc_after.items():
            base = gc_before[name]
            count = figures.get("gc_full_collections_total", 0) - base.get("gc_full_collections_total", 0)
            total = figures.get("gc_full_pause_seconds_total", 0) - base.get("gc_full_pause_seconds_total", 0)
            longest, earlier = figures.get("gc_full_pause_max_seconds", 0), base.get("gc_full_pause_max_seconds", 0)
            print(
                f"full GCs {name:10s} {count:.0f} during the move ({1000 * total:.1f} ms in all, "
                + (
                    f"the longest {1000 * longest:.1f} ms)"
                    if longest > earlier
                    else f"none longer than the {1000 * earlier:.1f} ms of one before it)"
                )
            )
        print(f"reads that missed  {misses}")
        print(f"load average       {os.getloadavg()[0]:.2f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--value-size", type=int, default=1024)
    parser.add_argument("--read-seconds", type=float, default=10.0, help="reads without a move")
    parser.add_argument("--read-rate", type=float, default=200.0, help="gets a second of each reader")
    parser.add_argument("--timeout", type=float, default=600.0, help="longest wait for the move")
    parser.add_argument("--handoff-rate", default="unlimited", help="the kvstores' --handoff-rate")
    parser.add_argument("--workdir", type=Path, help="keep the daemons' logs and data here")
    args = parser.parse_args()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return run(args, args.workdir)
    with tempfile.TemporaryDirectory(prefix="chashd-bench-handoff-") as tmp:
        return run(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
