"""The sender's drops of a handoff, in process: compare-and-remove of pushed pages on a real SQLite file.

    python bench/drops.py [--records 60000] [--value-size 1024] [--cached] [--busy] [--rounds 5] [--baseline DIR]

A template SQLite file of ``--records`` records (values of ``--value-size`` bytes, keys ``key:%012d``, as a
kvstore holds them after bench/handoff.py's load) is made once. Each round copies it, opens it as the kvstore
does (``SQLiteEngine(autocheckpoint=0)``; with ``--cached``, the record cache filled by a ``get`` of every key,
as a sender's is after the load's puts), then does the sender's work for half the hash space: pages of 500 rows
read with ``scan_rows`` in ring order, each dropped as ``Handoff._drop_rows`` does it (``remove_rows_if`` in a
``batch()`` of 250 rows), and after every 40 pages (about a second of a move) a ``checkpoint()`` as the
kvstore's timer does. Printed: CPU time (``time.thread_time``: the kernel's share included) per record for the
drops and for the checkpoints, the drops' wall time and context switches (median; the GIL handed over is
some of them), and the WAL bytes written per record dropped (the frames each checkpoint finds); the lowest
CPU of ``--rounds`` rounds (the median too). Each round checks that every record of the half is gone and the
other half intact. Code that has ``remove_run_if`` (the handoff's deferred drops) drops each run of 250 by
its digest (``run_digest``, made beforehand as the handoff's scan does; its CPU printed apart), older code with
``remove_rows_if``. With ``--busy``, another thread scans and encodes pages of the kept half beside the drops the whole
time, as a sender's other pool thread does during a move: the two then hand the GIL to each other each time
SQLite gives it up.

With ``--baseline DIR`` (a ``git archive`` of other code), the same rounds also run in a subprocess with ``DIR``
first on ``PYTHONPATH`` on a copy of the same template, the two alternating round by round, and the ratios this
code / that code are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from alternate import alternate

from chashd.bulk import encode_rows, split_rows
from chashd.ring import HASH_SPACE, key_hash
from chashd.storage import SQLiteEngine

CLOCK = 1_790_000_000_000 << 16
PAGE = 500
DROP_CHUNK = 250
PAGES_PER_CHECKPOINT = 40


def make_template(path: Path, records: int, value_size: int) -> None:
    """The file a kvstore would hold: made by one engine (its schema and settings), filled in one transaction."""
    SQLiteEngine(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    value = os.urandom(value_size)
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO records VALUES (?, ?, ?, 0, 0, ?, 'kvstore-A', 0)",
        ((key_hash(b"key:%012d" % i), b"key:%012d" % i, value, CLOCK + i - (1 << 63)) for i in range(records)),
    )
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def spin(engine: SQLiteEngine, stop: threading.Event) -> None:
    """Until ``stop`` is set (``--busy``): what a sender's other pool thread does meanwhile, pages of 500 of the
    half kept read with ``scan_rows`` and encoded into bulk pages, over and over."""
    after = None
    while not stop.is_set():
        rows = engine.scan_rows(HASH_SPACE // 2, HASH_SPACE - 1, after, PAGE)
        after = (key_hash(rows[-1][0]), rows[-1][0]) if len(rows) == PAGE else None
        for part in split_rows(rows, 250, 256 * 1024):
            encode_rows(part)


def switches() -> int:
    """The context switches of this thread so far (voluntary and not): waits for the GIL are some of them."""
    with open("/proc/thread-self/status", encoding="ascii") as f:
        return sum(int(line.split()[1]) for line in f if line.endswith("ctxt_switches:\t" + line.split()[-1] + "\n"))


def one_round(template: Path, cached: bool, busy: bool) -> dict[str, float]:
    """Drop half the hash space of a copy of ``template``; CPU and wall time per record."""
    stop = threading.Event()
    with tempfile.TemporaryDirectory(dir=template.parent) as tmp:
        path = Path(tmp) / "kvstore.db"
        shutil.copyfile(template, path)
        engine = SQLiteEngine(path, autocheckpoint=0)
        try:
            total = engine.stats()["keys"]
            if cached:
                for i in range(total):
                    engine.get(b"key:%012d" % i)
            spinner = threading.Thread(target=spin, args=(engine, stop), daemon=True)
            if busy:
                spinner.start()
            first, last = 0, HASH_SPACE // 2 - 1
            after = None
            dropped = drop_cpu = drop_wall = checkpoint_cpu = digest_cpu = 0.0
            runs = hasattr(engine, "remove_run_if")
            if runs:
                from chashd.bulk import run_digest
            drop_switches = 0
            wal = 0
            pages = 0
            while True:
                rows = engine.scan_rows(first, last, after, PAGE)
                if not rows:
                    break
                after = (key_hash(rows[-1][0]), rows[-1][0])
                chunks = [rows[start : start + DROP_CHUNK] for start in range(0, len(rows), DROP_CHUNK)]
                if runs:  # the handoff's deferred drop: each run's digest made as the page is read
                    start_cpu = time.thread_time()
                    digests = [(chunk[0][0], chunk[-1][0], run_digest(chunk)) for chunk in chunks]
                    digest_cpu += time.thread_time() - start_cpu
                before = switches()
                start_cpu, start_wall = time.thread_time(), time.perf_counter()
                for i, chunk in enumerate(chunks):
                    with engine.batch():
                        if runs:
                            dropped += engine.remove_run_if(*digests[i])
                        else:
                            dropped += engine.remove_rows_if(chunk)
                drop_cpu += time.thread_time() - start_cpu
                drop_wall += time.perf_counter() - start_wall
                drop_switches += switches() - before
                pages += 1
                if pages % PAGES_PER_CHECKPOINT == 0:
                    start_cpu = time.thread_time()
                    wal += engine.checkpoint()[0]  # the WAL's frames: those written since it last started over
                    checkpoint_cpu += time.thread_time() - start_cpu
            start_cpu = time.thread_time()
            wal += engine.checkpoint()[0]
            checkpoint_cpu += time.thread_time() - start_cpu
            wal *= engine._db.execute("PRAGMA page_size").fetchone()[0]
            left = engine.scan_rows(0, HASH_SPACE - 1, None, total + 1)
            assert not any(key_hash(row[0]) <= last for row in left), "a record of the dropped half is left"
            assert len(left) + dropped == total and engine.stats()["keys"] == len(left), "counts differ"
        finally:
            stop.set()
            if busy:
                spinner.join()
            engine.close()
    return {
        "drop_us": drop_cpu / dropped * 1e6,
        "drop_wall_us": drop_wall / dropped * 1e6,
        "switches": drop_switches / dropped * 1000,
        "digest_us": digest_cpu / dropped * 1e6,
        "checkpoint_us": checkpoint_cpu / dropped * 1e6,
        "wal_bytes": wal / dropped,
        "dropped": dropped,
    }


def main() -> None:
    """Make the template, run the rounds (alternating with the baseline's), print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=60_000)
    parser.add_argument("--value-size", type=int, default=1024)
    parser.add_argument("--cached", action="store_true", help="fill the record cache first, as a sender's is")
    parser.add_argument("--busy", action="store_true", help="a thread scans and encodes pages beside the drops")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="run this code too, from DIR on PYTHONPATH")
    parser.add_argument("--dir", type=Path, help="where the files go (default: a temporary directory)")
    parser.add_argument("--one-round", type=Path, help=argparse.SUPPRESS)  # a baseline's round on this template
    args = parser.parse_args()
    if args.one_round is not None:
        print(json.dumps(one_round(args.one_round, args.cached, args.busy)))
        return
    workdir = Path(tempfile.mkdtemp(prefix="drops-", dir=args.dir))
    try:
        template = workdir / "template.db"
        make_template(template, args.records, args.value_size)
        print(
            f"{args.records:,} records of {args.value_size} B, half dropped a round, record cache "
            f"{'filled' if args.cached else 'empty'}{', a busy thread beside' if args.busy else ''}; "
            f"load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        flags = ["--one-round", str(template)] + ["--cached"] * args.cached + ["--busy"] * args.busy
        measure = lambda: one_round(template, args.cached, args.busy)  # noqa: E731
        runs = alternate(args.rounds, measure, args.baseline, __file__, flags)
        best: dict[str, dict[str, float]] = {}
        for name, results in runs.items():
            best[name] = {part: min(r[part] for r in results) for part in results[0]}
            median = {part: statistics.median(r[part] for r in results) for part in results[0]}
            print(
                f"{name:10s} drops {best[name]['drop_us']:.2f} us CPU/record (median {median['drop_us']:.2f}; wall "
                f"{best[name]['drop_wall_us']:.2f}; {median['switches']:.0f} context switches a 1000; digests "
                f"{best[name]['digest_us']:.2f}), checkpoints {best[name]['checkpoint_us']:.2f} us "
                f"(median {median['checkpoint_us']:.2f}), WAL {best[name]['wal_bytes']:,.0f} B/record, "
                f"{int(best[name]['dropped']):,} dropped"
            )
        if args.baseline is not None:
            ratios = ", ".join(
                f"{part} {best['this code'][part] / best['baseline'][part]:.2f}x"
                for part in ("drop_us", "drop_wall_us", "switches", "checkpoint_us", "wal_bytes")
            )
            print(f"  this code / baseline: {ratios}")
        print(f"load average {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
