"""Ring benchmark: chashd's HashRing beside uhashring's ketama mode, on the same keys, in one run.

    python bench/ring.py [--keys N]

Prints lookups per second, build times, balance and movement, each with its target and the ratio.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable
from functools import partial

from uhashring import HashRing as UHashRing

from chashd.ring import HashRing


def rate(fn: Callable[[str], object], keys: list[str], rounds: int = 3) -> float:
    """Best calls per second over a few rounds."""
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for key in keys:
            fn(key)
        best = max(best, len(keys) / (time.perf_counter() - start))
    return best


def build_time(make: Callable[[], object], rounds: int = 3) -> float:
    """Best seconds to build."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        make()
        best = min(best, time.perf_counter() - start)
    return best


def balance(ring: HashRing, keys: list[str]) -> float:
    """Largest node's share of the keys divided by the mean share."""
    counts = Counter(ring.node_for(k) for k in keys)
    return max(counts.values()) / (len(keys) / len(ring))


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys for balance (default 1M)")
    args = parser.parse_args()

    nodes = {f"kvstore-{i}": 1 for i in range(10)}
    keys = [f"key:{i:08d}" for i in range(200_000)]
    ours = HashRing(nodes)
    theirs = UHashRing({n: {"weight": w} for n, w in nodes.items()}, hash_fn="ketama")
    assert all(ours.node_for(k) == theirs.get_node(k) for k in keys[:10_000]), "placement differs from uhashring"

    print(f"lookups over {len(keys):,} keys, 10 nodes (best of 3)")
    u_rate = rate(theirs.get_node, keys)
    n_rate = rate(ours.node_for, keys)
    p_rate = rate(lambda k: ours.preference_list(k, 3), keys)
    print(f"  uhashring get_node            {u_rate:12,.0f}/s")
    for label, value, target in (("node_for", n_rate, 1.3), ("preference_list(key, 3)", p_rate, 1.0)):
        ratio = value / u_rate
        check = f"target >= {target:.2f}x: {verdict(ratio >= target)}"
        print(f"  {label:30s}{value:12,.0f}/s   {ratio:5.2f}x uhashring  ({check})")

    print("build time")
    for count in (10, 100, 1000):
        members = {f"kvstore-{i}": 1 for i in range(count)}
        ours_t = build_time(partial(HashRing, members))
        theirs_t = build_time(partial(UHashRing, {n: {"weight": 1} for n in members}, hash_fn="ketama"), rounds=1)
        extra = f"  (target < 0.5 s: {verdict(ours_t < 0.5)})" if count == 1000 else ""
        print(f"  {count:5d} nodes  chashd {ours_t * 1000:8.1f} ms   uhashring {theirs_t * 1000:8.1f} ms{extra}")

    balance_keys = [f"bal:{i}" for i in range(args.keys)]
    print(f"balance: largest node's share / mean, {len(balance_keys):,} keys")
    best_at_10 = float("inf")
    for count in (10, 100):
        members = {f"kvstore-{i}": 1 for i in range(count)}
        for points in (160, 640, 1280, 2560):
            if count == 100 and points > 640:
                continue
            b = balance(HashRing(members, points_per_node=points), balance_keys)
            if count == 10:
                best_at_10 = min(best_at_10, b)
            label = "default" if points == 160 else f"{points // 160}x"
            print(f"  {count:3d} nodes, {points:5d} points/node ({label:>7s})  {b:.3f}")
    print(f"  best at 10 nodes: {best_at_10:.3f}  (target <= 1.05: {verdict(best_at_10 <= 1.05)})")

    old = HashRing({f"kvstore-{i}": 1 for i in range(10)})
    new = HashRing({f"kvstore-{i}": 1 for i in range(11)})
    moved = between_old = 0
    for key in balance_keys:
        before, after = old.node_for(key), new.node_for(key)
        if before != after:
            moved += 1
            if after != "kvstore-10":
                between_old += 1
    ideal = len(balance_keys) / 11
    print("movement: adding an 11th node to 10")
    ratio = moved / ideal
    print(f"  keys moved {moved:,} / ideal {ideal:,.0f} = {ratio:.3f}  (target <= 1.05: {verdict(ratio <= 1.05)})")
    print(f"  keys moved between two old nodes: {between_old}  (target 0: {verdict(between_old == 0)})")


if __name__ == "__main__":
    main()
