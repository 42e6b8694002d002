"""Storage engine benchmark: point puts and gets, batched applies, scans, memory per key, in one run.

    python bench/storage.py [--memory-keys N] [--sqlite-keys N] [--dir DIR]

MemoryEngine: puts of new keys, overwrites, gets and scan pages over ``--memory-keys`` keys (default 1M;
keys ``key:%012d`` of 16 bytes, distinct 100-byte values), the memory per stored key (RSS growth
while filling, records included, and tracemalloc's count on a tenth of the keys), and how long a full
garbage collection takes with the engine filled (a pause of the reactor thread).

SQLiteEngine (a file in ``--dir``, default a temporary directory, which must be on the disk the
daemon would use): puts with one transaction each (rate, p50/p99/max latency), the same with
``autocheckpoint=0`` and a thread calling ``checkpoint()`` every second, as a kvstore runs it (the WAL
file's largest size during the burst, sampled every 20 ms, against the bound the checkpoints keep it
under: 256 MiB plus the most the writers added between two checkpoints; its size after the burst and once
a checkpoint found the writers idle), a handoff receiver's burst (``apply_rows`` of pages of 250 records
of 1 KiB, the same checkpoint thread, the WAL's largest size against the same bound), applies in batches
of 1000 (new keys in ring order, as a handoff receiver gets them, and in any order), gets in random order,
scan pages, and the time ``SQLiteEngine()`` takes to open the filled file with and
without ``PRAGMA quick_check``.

Figures are printed, not asserted: this is a measurement, never a timed test.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import resource
import shutil
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from chashd.record import Record
from chashd.ring import HASH_SPACE, key_hash
from chashd.storage import MemoryEngine, SQLiteEngine
from chashd.versions import Version

VALUE_SIZE = 100
BASE_CLOCK = 1_700_000_000_000 << 16


def key(i: int) -> bytes:
    """The i-th key (16 bytes)."""
    return b"key:%012d" % i


def make_record(i: int) -> Record:
    """A record with a distinct 100-byte value, as a kvstore would hold."""
    return Record(b"%0100d" % i, 0, 0, Version(BASE_CLOCK + i, "kvstore-A"))


def rss_bytes() -> int:
    """The resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def timed(label: str, count: int, run: Callable[[], object], unit: str = "ops") -> float:
    """Run ``run`` once, print ``count / seconds``; the rate."""
    start = time.perf_counter()
    run()
    elapsed = time.perf_counter() - start
    rate = count / elapsed
    print(f"  {label:44s} {rate:12,.0f} {unit}/s   ({elapsed * 1e6 / count:7.2f} us each)")
    return rate


def scan_everything(engine: MemoryEngine | SQLiteEngine, page: int = 1000) -> int:
    """Page through the whole ring; the number of records seen."""
    seen = 0
    after = None
    while True:
        pairs = engine.scan(0, HASH_SPACE - 1, after, page)
        seen += len(pairs)
        if len(pairs) < page:
            return seen
        last = pairs[-1][0]
        after = (key_hash(last), last)


def latencies(label: str, calls: list[float]) -> None:
    """Print the rate, p50, p99 and max of per-call durations."""
    calls.sort()
    n = len(calls)
    print(
        f"  {label:44s} {n / sum(calls):12,.0f} ops/s   p50 {calls[n // 2] * 1e6:6.0f} us"
        f"  p99 {calls[int(n * 0.99)] * 1e6:6.0f} us  max {calls[-1] * 1e3:6.1f} ms"
    )


class WalWatch(threading.Thread):
    """Samples the size of a WAL file every 20 ms until stopped; keeps the largest."""

    def __init__(self, wal: Path) -> None:
        super().__init__(daemon=True)
        self.wal = wal
        self.largest = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            try:
                self.largest = max(self.largest, self.wal.stat().st_size)
            except FileNotFoundError:
                continue

    def stop(self) -> int:
        """Stop sampling; the largest size seen, in bytes."""
        self.done.set()
        self.join()
        return self.largest


class Checkpointer(threading.Thread):
    """Calls ``engine.checkpoint()`` every second, as a kvstore's pool does; notes the most WAL pages the
    writers added between two calls (``checkpoint()`` answers the WAL's pages; a restart starts them anew)."""

    def __init__(self, engine: SQLiteEngine) -> None:
        super().__init__(daemon=True)
        self.engine = engine
        self.done = threading.Event()
        self.most_added = 0

    def run(self) -> None:
        before = 0
        while not self.done.wait(1.0):
            frames, _copied = self.engine.checkpoint()
            self.most_added = max(self.most_added, frames - before if frames >= before else frames)
            before = frames

    def stop(self) -> None:
        self.done.set()
        self.join()


def print_wal(label: str, largest: int, most_added: int) -> None:
    """The WAL's largest size against its bound: a checkpoint restarts the WAL once it holds
    ``4 * restart_frames`` pages (4 x 4096 of 16 KiB: 256 MiB) during a burst, so it never holds more than
    that plus the pages the writers add between two checkpoints (measured: the most between two calls)."""
    bound = (4 * 4096 + most_added) * (16384 + 24)
    print(
        f"  {label:44s} {largest / 2**20:12,.1f} MiB   bound {bound / 2**20:,.0f} MiB (256 MiB + the most "
        f"written between two checkpoints, {most_added * 16384 / 2**20:,.0f} MiB): "
        f"{'under' if largest <= bound else 'OVER'}"
    )


def bench_memory(count: int) -> None:
    """MemoryEngine figures."""
    print(f"MemoryEngine, {count:,} keys of 16 bytes with {VALUE_SIZE}-byte values")
    gc.collect()
    rss_before = rss_bytes()
    engine = MemoryEngine()

    def fill() -> None:
        for i in range(count):
            engine.put(key(i), make_record(i))

    timed("put, new keys (record built in the loop)", count, fill)
    gc.collect()
    per_key = (rss_bytes() - rss_before) / count
    start = time.perf_counter()
    gc.collect()
    pause = time.perf_counter() - start
    order = list(range(count))
    random.Random(1).shuffle(order)
    keys = [key(i) for i in order]

    def overwrite() -> None:
        for i in order:
            engine.put(key(i), make_record(i))

    def get() -> None:
        for k in keys:
            engine.get(k)

    timed("put, existing keys (random order, record built)", count, overwrite)
    timed("get, random order", count, get)
    timed("scan, pages of 1000", count, lambda: scan_everything(engine), unit="records")
    print(f"  {'memory per key (RSS growth while filling)':44s} {per_key:12,.0f} bytes")
    print(f"  {'a full gc.collect() with the engine filled':44s} {pause * 1e3:12,.1f} ms")
    keys.clear()
    engine.close()
    gc.collect()

    sample = max(count // 10, 1)
    tracemalloc.start()
    engine = MemoryEngine()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(sample):
        engine.put(key(i), make_record(i))
    traced = (tracemalloc.get_traced_memory()[0] - before) / sample
    tracemalloc.stop()
    print(f"  {f'memory per key (tracemalloc, {sample:,} keys)':44s} {traced:12,.0f} bytes")
    print(f"  {'  of which the key and value themselves':44s} {16 + VALUE_SIZE:12,} bytes")
    engine.close()


def bench_sqlite(count: int, directory: Path) -> None:
    """SQLiteEngine figures."""
    print(f"SQLiteEngine, {count:,} keys of 16 bytes with {VALUE_SIZE}-byte values, in {directory}")
    path = directory / "bench.sqlite3"
    engine = SQLiteEngine(path)
    calls: list[float] = []
    clock = time.perf_counter
    for i in range(count):
        record = make_record(i)
        start = clock()
        engine.put(key(i), record)
        calls.append(clock() - start)
    latencies("put, a transaction each, autocheckpoint", calls)

    engine.close()
    engine = SQLiteEngine(path, autocheckpoint=0)
    wal = path.with_name(path.name + "-wal")
    watch = WalWatch(wal)
    watch.start()
    checkpointer = Checkpointer(engine)
    checkpointer.start()
    calls = []
    try:
        for i in range(count):
            record = make_record(i).with_version(Version(BASE_CLOCK + count + i, "kvstore-A"))
            start = clock()
            engine.put(key(i), record)
            calls.append(clock() - start)
    finally:
        checkpointer.stop()
    latencies("put, a transaction each, checkpoint() thread", calls)
    print_wal("  WAL's largest size during the burst", watch.stop(), checkpointer.most_added)
    print(f"  {'  WAL size after that':44s} {wal.stat().st_size / 2**20:12,.1f} MiB")
    engine.checkpoint()
    engine.checkpoint()  # nothing written since the previous call: the writers are idle
    print(f"  {'  WAL size once the writers are idle':44s} {wal.stat().st_size / 2**20:12,.1f} MiB")
    engine.close()
    bulk_burst(directory / "bulk.sqlite3", count)
    engine = SQLiteEngine(path)

    def apply_batched(keys: list[bytes]) -> None:
        for first in range(0, len(keys), 1000):
            with engine.batch():
                for k in keys[first : first + 1000]:
                    engine.apply(k, make_record(count))

    half = count // 2
    in_ring_order = sorted((key(count + i) for i in range(half)), key=lambda k: (key_hash(k), k))
    timed("apply, batches of 1000, new keys, ring order", half, lambda: apply_batched(in_ring_order))
    at_random = [key(count + half + i) for i in range(half)]
    timed("apply, batches of 1000, new keys, any order", half, lambda: apply_batched(at_random))
    keys = [key(i) for i in range(2 * count)]
    random.Random(1).shuffle(keys)
    timed("get, random order", len(keys), lambda: [engine.get(k) for k in keys])
    timed("scan, pages of 1000", 2 * count, lambda: scan_everything(engine), unit="records")
    engine.close()
    size = path.stat().st_size
    for check in (True, False):
        start = time.perf_counter()
        SQLiteEngine(path, check=check).close()
        label = f"open {2 * count:,} keys ({size / 2**20:,.0f} MiB), " + ("quick_check" if check else "no check")
        print(f"  {label:44s} {time.perf_counter() - start:12.2f} s")


def bulk_burst(path: Path, count: int) -> None:
    """A handoff receiver's burst: ``apply_rows`` of pages of 250 new records of 1 KiB, the checkpoint
    thread running; the rate and the WAL's largest size."""
    engine = SQLiteEngine(path, autocheckpoint=0)
    value = b"v" * 1024
    rows = sorted(
        ((key(i), value, 0, 0, BASE_CLOCK + i, "kvstore-A", 0) for i in range(count)), key=lambda r: key_hash(r[0])
    )
    watch = WalWatch(path.with_name(path.name + "-wal"))
    watch.start()
    checkpointer = Checkpointer(engine)
    checkpointer.start()
    try:
        start = time.perf_counter()
        for first in range(0, count, 250):
            engine.apply_rows(rows[first : first + 250])
        elapsed = time.perf_counter() - start
    finally:
        checkpointer.stop()
    print(f"  {'apply_rows, pages of 250 records of 1 KiB':44s} {count / elapsed:12,.0f} records/s")
    print_wal("  WAL's largest size during the burst", watch.stop(), checkpointer.most_added)
    engine.close()


def main() -> None:
    """Run both benchmarks."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-keys", type=int, default=1_000_000)
    parser.add_argument("--sqlite-keys", type=int, default=200_000)
    parser.add_argument("--dir", type=Path, default=None, help="where to put the SQLite file (default: a temp dir)")
    options = parser.parse_args()
    print(f"chashd storage benchmark, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs")
    bench_memory(options.memory_keys)
    directory = Path(tempfile.mkdtemp(prefix="chashd-bench-", dir=options.dir))
    try:
        bench_sqlite(options.sqlite_keys, directory)
    finally:
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
