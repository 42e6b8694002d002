"""Fault-injection figures: availability during each fault and the time from heal to full replication.

    .venv/bin/python bench/faults.py [--seed 11] [--length 150] [--faults kill,pause,...] [--convergence 120]

Runs the fault-injection runner (tests/faults, as root: a private network namespace, 3 gateways and 4 SQLite
kvstores on their own 127.0.0.x addresses, 4 writers and 2 readers through every gateway) for the seeded
schedule, with replication reported rather than enforced, and waiting up to ``--convergence`` seconds after
the last heal for every key to be back on N replicas. Prints, from the run's history:

- the operations: acknowledged, failed, indeterminate, by kind;
- availability during each fault: the share of the operations invoked between the fault and its heal that
  failed or timed out, against the share outside every fault;
- latency of the acknowledged operations (median and p99), outside faults and during them;
- the time from the heal to every key on N replicas (or how many keys were not, when the wait ran out);
- the checker's verdict (the same run is a test: violations are listed).

Anti-entropy's cost (CPU per key compared, foreground p99 with and without it) needs anti-entropy in the
kvstores: pass its kvstore options with ``--kvstore-arg`` to compare two runs of the same seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as ``python bench/faults.py``: the harness lives in tests/faults
    sys.path.insert(0, str(ROOT))

from tests.faults.history import OK, Op, read_history  # noqa: E402
from tests.faults.netns import SKIP_STATUS, preflight, run_in_namespace  # noqa: E402
from tests.faults.stats import percentile  # noqa: E402


def _latencies(ops: Sequence[Op], windows: Sequence[tuple[float, float]], inside: bool) -> list[float]:
    def faulted(op: Op) -> bool:
        return any(start <= op.invoke < end for start, end in windows)

    return [op.complete - op.invoke for op in ops if op.outcome == OK and faulted(op) == inside]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.1f} ms"


def report(result: dict[str, Any], ops: Sequence[Op]) -> str:
    """The figures of a finished run, as lines of text."""
    lines = [f"seed {result['seed']}: {len(result['events'])} faults"]
    total = {o: sum(c.get(o, 0) for c in result["counts"].values()) for o in ("ok", "fail", "info")}
    lines.append(
        f"operations: {sum(total.values())}, acknowledged {total['ok']}, failed {total['fail']}, "
        f"indeterminate {total['info']}"
    )
    for kind, counts in sorted(result["counts"].items()):
        lines.append(
            f"  {kind:7s} {counts.get('ok', 0):7d} ok {counts.get('fail', 0):5d} fail {counts.get('info', 0):5d} info"
        )
    lines.append("availability (share of operations that failed or timed out):")
    for w in result["availability"]:
        lines.append(
            f"  {w['label']:34s} {w['start']:7.1f}-{w['end']:7.1f}s {w['ops']:6d} ops {100 * w['failed_share']:6.2f}%"
        )
    clients = [op for op in ops if op.client not in ("final", "setup")]
    windows = [(e["start"], e["end"]) for e in result["events"]]
    calm, faulted = _latencies(clients, windows, False), _latencies(clients, windows, True)
    lines.append(
        f"latency of acknowledged operations: outside faults median {_ms(percentile(calm, 0.5))} "
        f"p99 {_ms(percentile(calm, 0.99))}; during faults median {_ms(percentile(faulted, 0.5))} "
        f"p99 {_ms(percentile(faulted, 0.99))}"
    )
    healed = result.get("heal_to_replication")
    checked, under = result["replicas_checked"], result["under_replicated"]
    if healed is not None:
        lines.append(f"heal to full replication: {healed:.1f} s ({checked} keys on N replicas)")
    else:
        lines.append(
            f"heal to full replication: not reached within {result.get('convergence', 0):g} s "
            f"({under} of {checked} keys on fewer than N replicas)"
        )
    lines.append(f"settled {result.get('settle_seconds')} s after the clients stopped")
    violations = result["categories"]
    lines.append(
        "checker: " + (", ".join(f"{n} {c}" for c, n in violations.items()) if violations else "no violations")
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--length", type=float, default=150.0, help="seconds of faults to schedule")
    p.add_argument("--faults", default="", help="comma-separated faults (default: all)")
    p.add_argument("--convergence", type=float, default=120.0, help="longest wait for full replication")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--kvstore-arg", action="append", default=[], help="an option for every kvstore (repeatable)")
    args = p.parse_args(argv)
    reason = preflight()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return SKIP_STATUS
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chashd-bench-faults-"))
    runner_args = [
        "--seed", str(args.seed),
        "--length", str(args.length),
        "--report", "under-replicated",
        "--convergence", str(args.convergence),
        "--workdir", str(workdir),
        *(["--faults", args.faults] if args.faults else []),
        *(f"--kvstore-arg={a}" for a in args.kvstore_arg),
    ]  # fmt: skip
    result = run_in_namespace(runner_args, ROOT, timeout=args.length * 4 + args.convergence + 900)
    path = workdir / "result.json"
    if not path.exists():
        sys.stdout.write(result.stdout[-6000:])
        print(f"the run failed (status {result.returncode})", file=sys.stderr)
        return 2
    body = json.loads(path.read_text())
    print(report(body, read_history(workdir / "history.jsonl")))
    print(f"history, events and logs: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
