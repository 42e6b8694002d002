"""Hot-key benchmark: how long read-modify-writes of one key wait while its primary is down.

    python bench/hot_key.py [--seconds 6] [--clients 8] [--workdir DIR]

Starts one real gateway and three real kvstores (memory engine, N=3, W=2, R=2) on loopback (``LocalCluster``),
the gateway probing every 0.2 s and marking a node down after 3 failed probes (``--dead-after`` 600: nothing is
removed). ``--clients`` closed-loop line-protocol clients (one request in flight each) send ``incr`` through the
gateway for ``--seconds`` in each phase:

- ``up, hot``: every kvstore up, every client on the same key;
- ``down, hot``: the hot key's primary stopped (SIGSTOP) and marked down (the phase starts once the gateway
  says so), every client on the same key (the map moved its primary: USAGE.md, "Failures and consistency");
- ``down, spread``: the same, each client on keys of its own whose primary is the stopped node.

Prints, per phase, incr/s, errors, p50/p99/max latency, and how much the gateway's counters
``rmw_lease_waits_total``, ``rmw_lease_polls_total`` and ``rmw_turns_waited_total`` grew (absent
counters, on a version without them, print as -). Every process is stopped by its pid at the end (after
SIGCONT), also on failure. Run it twice with ``PYTHONPATH`` naming two trees to compare versions.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from handoff import LineClient

from chashd.launcher import LocalCluster, http_json, wait_for

COUNTERS = ("rmw_lease_waits_total", "rmw_lease_polls_total", "rmw_turns_waited_total")


def stats(port: int) -> dict[str, str]:
    """The gateway's ``stats`` over its line port."""
    client = LineClient(port)
    try:
        client.sock.sendall(b"stats\r\n")
        reply = client.read_until(b"END\r\n")
    finally:
        client.close()
    found: dict[str, str] = {}
    for line in reply.decode().splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0] == "STAT":
            found[parts[1]] = parts[2]
    return found


def incr_loop(port: int, keys: list[bytes], stop: threading.Event, out: list[tuple[float, bool]]) -> None:
    """One closed-loop client: ``incr`` of ``keys`` in turn until ``stop``; (seconds, ok) per request."""
    client = LineClient(port)
    try:
        i = 0
        while not stop.is_set():
            began = time.monotonic()
            client.sock.sendall(b"incr %s 1\r\n" % keys[i % len(keys)])
            reply = client.read_until(b"\r\n")
            out.append((time.monotonic() - began, not reply.startswith((b"SERVER_ERROR", b"CLIENT_ERROR", b"ERROR"))))
            i += 1
    finally:
        client.close()


def phase(port: int, key_sets: list[list[bytes]], seconds: float) -> dict[str, Any]:
    """Run one client per key set for ``seconds``: the figures, and the gateway counters' growth."""
    before = stats(port)
    stop = threading.Event()
    results: list[list[tuple[float, bool]]] = [[] for _ in key_sets]
    threads = [
        threading.Thread(target=incr_loop, args=(port, keys, stop, out), daemon=True)
        for keys, out in zip(key_sets, results)
    ]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(30)
    after = stats(port)
    samples = sorted(s for out in results for s, _ in out)
    errors = sum(1 for out in results for _, ok in out if not ok)

    def pct(fraction: float) -> float:
        return samples[min(len(samples) - 1, int(fraction * len(samples)))] if samples else float("nan")

    grown = {name: int(after[name]) - int(before[name]) if name in after else None for name in COUNTERS}
    return {
        "rate": len(samples) / seconds,
        "errors": errors,
        "p50": pct(0.5),
        "p99": pct(0.99),
        "max": samples[-1] if samples else float("nan"),
        **grown,
    }


def primary_of(url: str, key: bytes) -> str:
    _, body = http_json(f"{url}/ring/lookup/{key.decode()}")
    return str(body["nodes"][0]["id"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each phase")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients, one request in flight each")
    parser.add_argument("--workdir", type=Path, default=None, help="where logs go (default: a temporary dir)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chashd-hotkey-"))
    gateway_args = ["--probe-interval", "0.2", "--down-after", "3", "--dead-after", "600"]
    figures: dict[str, dict[str, Any]] = {}
    with LocalCluster(workdir, gateways=1, kvstores=3, gateway_args=gateway_args) as cluster:
        gateway = cluster.gateways[0]
        port = cluster.line_ports[gateway.name]
        hot = b"hot"
        victim_name = primary_of(gateway.url, hot)
        victim = next(k for k in cluster.kvstores if k.name == victim_name)
        # Keys of the victim's: each client of the spread phase its own 16.
        own = [k for k in (b"spread-%06d" % i for i in range(5000)) if primary_of(gateway.url, k) == victim_name]
        spread = [own[16 * c : 16 * (c + 1)] for c in range(args.clients)]
        loader = LineClient(port)
        for key in [hot, *own[: 16 * args.clients]]:
            loader.sock.sendall(b"set %s 0 0 1\r\n0\r\n" % key)
            loader.read_until(b"\r\n")
        loader.close()
        figures["up, hot"] = phase(port, [[hot]] * args.clients, args.seconds)
        victim.signal(signal.SIGSTOP)
        try:

            def marked_down() -> bool:
                _, body = http_json(f"{gateway.url}/ring/lookup/{hot.decode()}")
                return bool(body["nodes"][0]["state"] == "down")

            wait_for(f"{victim_name} marked down", marked_down, timeout=30)
            time.sleep(0.5)  # the gateway's router follows its map
            figures["down, hot"] = phase(port, [[hot]] * args.clients, args.seconds)
            figures["down, spread"] = phase(port, spread, args.seconds)
        finally:
            victim.signal(signal.SIGCONT)
    print(f"{args.clients} clients, {args.seconds:g} s per phase, the hot key's primary {victim_name}")
    print("| phase | incr/s | errors | p50 / p99 / max (ms) | lease waits | polls | turns waited |")
    print("|---|---|---|---|---|---|---|")
    for name, f in figures.items():
        times = " / ".join(f"{1000 * f[k]:.1f}" for k in ("p50", "p99", "max"))
        counts = " | ".join("-" if f[c] is None else str(f[c]) for c in COUNTERS)
        print(f"| {name} | {f['rate']:,.0f} | {f['errors']} | {times} | {counts} |")
    print(f"logs: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
