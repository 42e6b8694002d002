"""Latency histograms' cost: a kvstore's line protocol with and without them, in one run.

    python bench/histograms.py [--seconds 10] [--warmup 3] [--rounds 5]
    python bench/histograms.py --inprocess      # only the in-process check

Every request a daemon answers is timed into ``chashd_request_duration_seconds`` (chashd/web/_metrics.py);
``--latency-histograms off`` turns that off. The kvstore with the memory engine is where it costs most (its
requests are the cheapest there are: a get is answered from a dict on the reactor thread), so this runs
``twistd chash-kvstore --engine memory`` with them (``hist``) and without (``nohist``), in ``--rounds``
interleaved rounds under bench/kvstore.py's load (50 connections, 90% get / 10% set), and prints each
round's ops/s and the server's CPU per request, the best round of each and the median of the per-round
ratios hist / nohist (ops/s, and CPU per request, which holds up better when other work takes the server's
core). The target: at most 3% apart; when the rounds' CPU ratios spread wider than that (their quartiles),
the run says it cannot tell.

``--inprocess`` feeds the same request mix to the server protocol over LocalBackend and MemoryEngine without
sockets, with no histograms, with chashd's (a bucket list per command family, no lock) and with
prometheus-client's ``Histogram`` children, which take a lock per observation: why chashd keeps its own
buckets and only exports them through prometheus-client.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvstore import add_load_options, build_loadgen, inprocess_rate, measure, requests
from prometheus_client import CollectorRegistry, Histogram

from chashd.kvstore.backend import LocalBackend
from chashd.memcache.server import MemcacheServerFactory
from chashd.metrics import BUCKETS, SURFACES, RequestMetrics
from chashd.storage.memory import MemoryEngine

VARIANTS = {"hist": [], "nohist": ["--latency-histograms", "off"]}


class _ClientHistogram:
    """prometheus-client's Histogram child behind chashd's histogram interface (for --inprocess only)."""

    registry = CollectorRegistry()
    family = Histogram("bench_seconds", "bench", ["surface", "command"], registry=registry, buckets=BUCKETS)

    def __init__(self, surface: str, command: str) -> None:
        self.observe = self.family.labels(surface, command).observe

    def cumulative(self) -> list[tuple[str, float]]:
        return []


def _client_metrics() -> RequestMetrics:
    metrics = RequestMetrics()
    metrics._histograms = {
        (s, f): _ClientHistogram(s, f)  # type: ignore[misc]
        for s, families in SURFACES.items()
        for f in families
    }
    return metrics


def inprocess(args: argparse.Namespace) -> None:
    """Requests per second through dataReceived with each kind of histogram, 1 request a call, in
    ``--inprocess-rounds`` rounds that run every variant back to back (in a rotating order), so that each
    round's ratios compare runs made under the same load: the median of those ratios, and each variant's
    best round."""
    from twisted.internet import reactor

    mix = requests(50_000, args.keys, args.get_percent, args.value_size)
    preload = requests(args.keys, args.keys, 0, args.value_size)
    builds = {}
    for name, metrics in (("none", None), ("chashd", RequestMetrics()), ("prometheus-client", _client_metrics())):
        backend = LocalBackend(MemoryEngine(), "bench", reactor, 1024 * 1024)
        factory = MemcacheServerFactory(backend, reactor, idle_timeout=0, requests=metrics)
        builds[name] = partial(factory.buildProtocol, None)
        inprocess_rate(builds[name], preload, 100)
    names = list(builds)
    runs: dict[str, list[float]] = {name: [] for name in names}
    for i in range(args.inprocess_rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            runs[name].append(inprocess_rate(builds[name], mix, 1))
    rounds = args.inprocess_rounds
    print(f"in process (no sockets), requests/s through dataReceived, 1 request a call, {rounds} rounds:")
    for name in names:
        best = max(runs[name])
        line = f"  histograms {name:18} best {best:10,.0f}  {1e6 / best:6.2f} us/request"
        if name != "none":
            ratios = [a / b for a, b in zip(runs[name], runs["none"])]
            extra = 1e6 / statistics.median(runs[name]) - 1e6 / statistics.median(runs["none"])
            line += f"  median ratio to none {statistics.median(ratios):.3f}, +{extra:.2f} us/request (medians)"
        print(line)


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_load_options(parser)
    parser.add_argument("--rounds", type=int, default=5, help="runs of each variant, interleaved")
    parser.add_argument("--inprocess", action="store_true", help="only the in-process check")
    parser.add_argument("--inprocess-rounds", type=int, default=20, help="rounds of the in-process check")
    args = parser.parse_args()
    inprocess(args)
    if args.inprocess:
        return
    with tempfile.TemporaryDirectory(prefix="chashd-bench-") as tmp:
        work = Path(tmp)
        loadgen = build_loadgen(work)
        print(
            f"\nkvstore (memory engine), {args.connections} connections, {args.get_percent}% get, "
            f"{args.seconds:g}s after {args.warmup:g}s warm-up, {args.rounds} interleaved rounds"
        )
        print(f"{'variant':8} {'round':>5} {'ops/s':>10} {'p50 us':>7} {'p99 us':>7} {'server CPU':>10} {'us/op':>6}")
        figures: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
        for round_number in range(1, args.rounds + 1):
            for name, extra in VARIANTS.items():
                result = measure("memory", loadgen, args, work, extra_args=extra)
                figures[name].append(result)
                print(
                    f"{name:8} {round_number:5d} {result['ops_per_s']:10,.0f} {result['p50_us']:7.0f} "
                    f"{result['p99_us']:7.0f} {result['server_cpu']:9.0f}% {result['cpu_us_per_op']:6.2f}",
                    flush=True,
                )
        best = {name: max(r["ops_per_s"] for r in runs) for name, runs in figures.items()}
        ratios = [h["ops_per_s"] / n["ops_per_s"] for h, n in zip(figures["hist"], figures["nohist"])]
        cpu_ratios = [h["cpu_us_per_op"] / n["cpu_us_per_op"] for h, n in zip(figures["hist"], figures["nohist"])]
        print(
            f"\nbest round: hist {best['hist']:,.0f} ops/s, nohist {best['nohist']:,.0f} ops/s, "
            f"ratio {best['hist'] / best['nohist']:.3f}"
        )
        print(
            f"median of the rounds' ratios hist / nohist: ops/s {statistics.median(ratios):.3f}, "
            f"server CPU per request {statistics.median(cpu_ratios):.3f}"
        )
        low, _, high = statistics.quantiles(cpu_ratios, n=4) if len(cpu_ratios) > 1 else (1.0, 1.0, 1.0)
        print(f"CPU per request ratio, quartiles of the rounds: {low:.3f} .. {high:.3f}")
        if high - low > 0.03:
            print("target (at most 3% apart): inconclusive here: the rounds disagree by more than the target")
        else:
            verdict = "met" if abs(1 - statistics.median(cpu_ratios)) <= 0.03 else "NOT met"
            print(f"target (at most 3% apart, by server CPU per request): {verdict}")


if __name__ == "__main__":
    main()
