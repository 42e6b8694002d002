"""The receiver's CPU for applying bulk pages to SQLite: ``SQLiteEngine.apply_rows`` of a handoff's pages.

    python bench/bulk_apply.py [--records 40000] [--rows 245] [--value-size 1024] [--repaired 0.5]
                               [--rounds 5] [--baseline DIR]

A fresh ``SQLiteEngine`` (the kvstore's settings: ``autocheckpoint=0``, a ``checkpoint()`` every 40 pages, as
its pool runs one every second or so) receives ``--records`` records in pages of ``--rows`` rows in scan
order (``(hash, key)``, as a handoff's sender reads an arc), decoded from their bulk page (``decode_rows``).
Before a share ``--repaired`` of the pages arrives, one of its keys is written by ``apply`` with the version
the page brings (what the gateway's read repair of a moving key does on the new owner during a move: the page's
row then loses). Printed: CPU time (``time.thread_time``) per row of ``apply_rows`` (its commit included),
the lowest and the median of ``--rounds`` rounds, and the records and bytes the engine counts.

With ``--baseline DIR`` (a ``git archive`` of other code), the same rounds also run in a subprocess with ``DIR``
first on ``PYTHONPATH``, the two alternating round by round, and the ratios this code / that code are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from alternate import alternate

from chashd.bulk import decode_rows, encode_rows
from chashd.record import Record
from chashd.ring import key_hashes
from chashd.storage import SQLiteEngine
from chashd.versions import Version


def measure(records: int, rows: int, value_size: int, repaired: float) -> dict[str, float]:
    """One round: us of CPU per row of ``apply_rows``, and the engine's counts afterwards."""
    keys = [b"key:%012d" % i for i in range(records)]
    hashes = key_hashes(keys)
    order = sorted(range(records), key=lambda i: (hashes[i], keys[i]))
    values = [os.urandom(value_size) for _ in range(64)]
    page_rows = [(keys[i], values[i % 64], 0, 0, (1 << 40) + i, "kvstore-A", 0) for i in order]
    pages = []
    for first in range(0, records, rows):
        count, block = encode_rows(page_rows[first : first + rows])
        pages.append(decode_rows(block, count, 1 << 20))
    step = max(1, round(1 / repaired)) if repaired > 0 else 0
    workdir = tempfile.mkdtemp(prefix="bulk-apply-")
    try:
        engine = SQLiteEngine(Path(workdir) / "db.sqlite", autocheckpoint=0)
        spent = 0.0
        for number, page in enumerate(pages):
            if step and number % step == 0:
                key, value, flags, expires_at, clock, writer, tombstone = page[len(page) // 2]
                engine.apply(key, Record(value, flags, expires_at, Version(clock, writer), bool(tombstone)))
            start = time.thread_time()
            engine.apply_rows(page)
            spent += time.thread_time() - start
            if number % 40 == 39:
                engine.checkpoint()
        stats = engine.stats()
        engine.close()
    finally:
        shutil.rmtree(workdir)
    return {"apply": spent / records * 1e6, "keys": stats["keys"], "bytes": stats["bytes"]}


def main() -> None:
    """Run the rounds and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=40000)
    parser.add_argument("--rows", type=int, default=245, help="rows a page (245 of 1 KiB fill a 256 KiB page)")
    parser.add_argument("--value-size", type=int, default=1024)
    parser.add_argument("--repaired", type=float, default=0.5, help="share of the pages with a key written first")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="run this code too, from DIR on PYTHONPATH")
    parser.add_argument("--one-round", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = (args.records, args.rows, args.value_size, args.repaired)
    if args.one_round:
        print(json.dumps(measure(*sizes)))
        return
    one_round = ["--one-round", "--records", str(args.records), "--rows", str(args.rows)]
    one_round += ["--value-size", str(args.value_size), "--repaired", str(args.repaired)]
    runs = alternate(args.rounds, lambda: measure(*sizes), args.baseline, __file__, one_round)
    print(
        f"{args.records:,} records of {args.value_size} B in pages of {args.rows}, {args.repaired:.0%} of the pages"
        f" with a key written first; {args.rounds} rounds, load average {os.getloadavg()[0]:.2f}:"
    )
    for name, rounds in runs.items():
        spent = [r["apply"] for r in rounds]
        counts = {(int(r["keys"]), int(r["bytes"])) for r in rounds}
        print(
            f"  {name:10} apply_rows {min(spent):.2f} us a row (lowest), {statistics.median(spent):.2f} (median);"
            f" counted {', '.join(f'{k:,} records, {b:,} bytes' for k, b in sorted(counts))}"
        )
    if args.baseline is not None:
        low = min(r["apply"] for r in runs["this code"]) / min(r["apply"] for r in runs["baseline"])
        mid = statistics.median(r["apply"] for r in runs["this code"]) / statistics.median(
            r["apply"] for r in runs["baseline"]
        )
        print(f"  this code / baseline: {low:.2f}x (lowest), {mid:.2f}x (median)")


if __name__ == "__main__":
    main()
