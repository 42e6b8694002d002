"""The receiver's CPU for a bulk page outside SQLite: parsing it from the reads it arrives in, and decoding it.

    python bench/bulk_page.py [--rows 250] [--value-size 1024] [--read 65536] [--pages 300] [--rounds 15]
                              [--baseline DIR]

An ``xbulk`` page of ``--rows`` rows (values of ``--value-size`` random bytes, as bench/handoff.py's sender
makes them: about 256 KiB at the defaults) is cut into reads of ``--read`` bytes (Twisted's TCP read size) and
fed to a ``RequestParser``, each read followed by ``next()`` until it has nothing, as the line server does;
then the page's block goes through ``decode_rows``. Printed: CPU time (``time.thread_time``: page faults and
the kernel's share included) per page and per row of each, the lowest of ``--rounds`` rounds of ``--pages``
pages.

With ``--baseline DIR`` (a ``git archive`` of other code), the same measurement also runs in a subprocess with
``DIR`` first on ``PYTHONPATH``, the two alternating round by round, and the ratios this code / that code are
printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from alternate import alternate

from chashd.bulk import decode_rows, encode_rows
from chashd.commands import XBulk
from chashd.memcache.text import RequestParser, serialize_command


def measure(rows: int, value_size: int, read: int, pages: int) -> dict[str, float]:
    """One round: us of CPU per page for the parse and for the decode."""
    value = os.urandom(value_size)
    page = [(b"key:%012d" % i, value, 0, 0, (1 << 40) + i, "kvstore-A", 0) for i in range(rows)]
    count, block = encode_rows(page)
    wire = serialize_command(XBulk(count, block))
    reads = [wire[i : i + read] for i in range(0, len(wire), read)]
    parser = RequestParser(max_value_size=1 << 20)
    start = time.thread_time()
    for _ in range(pages):
        for data in reads:
            parser.feed(data)
            while parser.next() is not None:
                pass
    parse = time.thread_time() - start
    parser.feed(wire)
    got = parser.next()
    assert isinstance(got, XBulk) and got.block == block
    start = time.thread_time()
    for _ in range(pages):
        decode_rows(block, count, 1 << 20)
    decode = time.thread_time() - start
    return {"parse": parse / pages * 1e6, "decode": decode / pages * 1e6}


def main() -> None:
    """Run the rounds and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=250)
    parser.add_argument("--value-size", type=int, default=1024)
    parser.add_argument("--read", type=int, default=65536, help="bytes a read of the connection brings")
    parser.add_argument("--pages", type=int, default=300, help="pages a round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--baseline", type=Path, help="run this code too, from DIR on PYTHONPATH")
    parser.add_argument("--one-round", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = (args.rows, args.value_size, args.read, args.pages)
    if args.one_round:
        print(json.dumps(measure(*sizes)))
        return
    one_round = ["--one-round", "--rows", str(args.rows), "--value-size", str(args.value_size)]
    one_round += ["--read", str(args.read), "--pages", str(args.pages)]
    runs = alternate(args.rounds, lambda: measure(*sizes), args.baseline, __file__, one_round)
    print(f"a page of {args.rows} rows of {args.value_size} B in reads of {args.read} B, lowest of {args.rounds}")
    print(f"rounds of {args.pages} pages, load average {os.getloadavg()[0]:.2f}:")
    best = {name: {part: min(r[part] for r in rounds) for part in ("parse", "decode")} for name, rounds in runs.items()}
    for name, parts in best.items():
        figures = ", ".join(f"{part} {us:.1f} us a page ({us / args.rows:.3f} a row)" for part, us in parts.items())
        print(f"  {name:10} {figures}")
    if args.baseline is not None:
        ratios = ", ".join(
            f"{part} {best['this code'][part] / best['baseline'][part]:.2f}x" for part in best["baseline"]
        )
        print(f"  this code / baseline: {ratios}")


if __name__ == "__main__":
    main()
