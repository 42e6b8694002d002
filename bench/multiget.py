"""Multi-key gets: a 100-key get through a gateway beside 100 one-key gets and beside twemproxy, in one run.

    python bench/multiget.py [--seconds 10] [--warmup 3] [--rounds 2] [--multi 100]
                             [--targets gateway-n1,gateway-n3,twemproxy]

Load (bench/loadgen.c, bench/kvstore.py's generator): 50 connections, each with one request in flight, gets
only, 32-byte keys drawn from 10,000 (all set first), 100-byte values; two runs per target:

- ``multi``: every request is a get of ``--multi`` (100) consecutive keys from a random one;
- ``single``: every request is a get of one key.

Targets (bench/gateway.py's, each started once per round, rounds interleaved, the best round counts):
``gateway-n1`` (one gateway, N=1, over three kvstores of the memory engine), ``gateway-n3`` (N=3, W=2, R=2),
``twemproxy`` (nutcracker, ketama, over three ``memcached -t 1``: the same multi-get split by server and
joined). Every server process of a target runs on core 1, the generator on core 0.

Printed per run: requests/s, keys/s, p50 and p99 of a request, the servers' CPU per key (from /proc over the
measured window). Then, per target, keys/s of the 100-key gets over keys/s of the one-key gets (what a client
gains by batching), and the gateway's 100-key gets against twemproxy's (requests/s and p99).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import twemproxy
from gateway import drive, started
from kvstore import add_load_options, build_loadgen


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_load_options(parser)
    parser.set_defaults(get_percent=100)
    parser.add_argument("--multi", type=int, default=100, help="keys in one get of the multi run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each target, interleaved; the best counts")
    parser.add_argument("--targets", default="gateway-n1,gateway-n3,twemproxy")
    args = parser.parse_args()
    names = args.targets.split(",")
    nutcracker = twemproxy.ensure_nutcracker() if "twemproxy" in names else None
    if "twemproxy" in names and nutcracker is None:
        names.remove("twemproxy")
    best: dict[tuple[str, str], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="chashd-bench-") as tmp:
        work = Path(tmp)
        loadgen = build_loadgen(work)
        print(
            f"\nload: {args.connections} connections, gets only, {args.keys} keys of 32 bytes, "
            f"{args.value_size}-byte values; multi: {args.multi} keys a get, single: 1; {args.seconds:g}s after "
            f"{args.warmup:g}s warm-up; generator on core 0, every server process of a target on core 1"
        )
        print(
            f"{'target':11} {'run':6} {'round':>5} {'requests/s':>11} {'keys/s':>10} {'p50 us':>7} {'p99 us':>7} "
            f"{'errors':>6} {'us/key':>7}"
        )
        for number in range(1, args.rounds + 1):
            for name in names:
                with started(name, work, nutcracker) as running:
                    for run, multi in (("single", 1), ("multi", args.multi)):
                        load = copy.copy(args)
                        load.multi = multi
                        figures = drive(loadgen, running, load, name)
                        figures["keys_per_s"] = figures["ops_per_s"] * multi
                        figures["cpu_us_per_key"] = figures["cpu_us_per_op"] / multi
                        if (name, run) not in best or figures["keys_per_s"] > best[name, run]["keys_per_s"]:
                            best[name, run] = figures
                        line = f"{name:11} {run:6} {number:5d} {figures['ops_per_s']:11,.0f} "
                        line += f"{figures['keys_per_s']:10,.0f} {figures['p50_us']:7.0f} {figures['p99_us']:7.0f} "
                        print(f"{line}{figures['errors']:6d} {figures['cpu_us_per_key']:7.2f}", flush=True)
    print("\nbest round of each:")
    for name in names:
        single, multi = best[name, "single"], best[name, "multi"]
        print(
            f"{name:11} {args.multi}-key gets: {multi['ops_per_s']:,.0f} requests/s = {multi['keys_per_s']:,.0f} "
            f"keys/s, p99 {multi['p99_us']:.0f} us, {multi['cpu_us_per_key']:.2f} us CPU a key; one-key gets: "
            f"{single['ops_per_s']:,.0f}/s, p99 {single['p99_us']:.0f} us, {single['cpu_us_per_key']:.2f} us CPU a "
            f"key; keys/s {multi['keys_per_s'] / single['keys_per_s']:.1f}x"
        )
    if "twemproxy" in names:
        reference = best["twemproxy", "multi"]
        for name in names:
            if name == "twemproxy":
                continue
            mine = best[name, "multi"]
            print(
                f"{name} / twemproxy, {args.multi}-key gets: {mine['ops_per_s'] / reference['ops_per_s']:.2f}x "
                f"requests/s, p99 {mine['p99_us']:.0f} against {reference['p99_us']:.0f} us"
            )


if __name__ == "__main__":
    main()
