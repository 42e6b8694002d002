"""Fault-injection figures: availability during each fault, the time from heal to full replication, and
anti-entropy's cost.

    .venv/bin/python bench/faults.py [--seed 11] [--length 150] [--faults kill,pause,...] [--convergence 120]
                                     [--anti-entropy-interval 10] [--no-baseline]

Runs the fault-injection runner (tests/faults, as root: a private network namespace, 3 gateways and 4 SQLite
kvstores on their own 127.0.0.x addresses, 4 writers and 2 readers through every gateway) for the seeded
schedule, with replication reported rather than enforced, and waiting up to ``--convergence`` seconds after
the last heal for every key to be back on N replicas. Prints, from the run's history:

- the operations: acknowledged, failed, indeterminate, by kind;
- availability during each fault: the share of the operations invoked between the fault and its heal that
  failed or timed out, the same share in the 5 s after its heal (up to the next fault: a fault can cost
  more than its window), and the share outside every fault;
- latency of the acknowledged operations (median and p99), outside faults and during them;
- the time from the heal to every key on N replicas (or how many keys were not, when the wait ran out);
- the checker's verdict (the same run is a test: violations are listed).

The kvstores run anti-entropy every ``--anti-entropy-interval`` seconds. Then the same seed runs again with
anti-entropy off (the baseline; ``--no-baseline`` skips it), and the figures of the two runs are printed side
by side: the p99 of the acknowledged operations outside faults and during them (the foreground cost), the
time from the heal to full replication (never reached without anti-entropy, unless reads repaired every
key), and the CPU anti-entropy used in the kvstores that ran to the end (``antientropy_cpu_seconds_total``,
its scans and comparisons timed in the daemon) per key compared and per key scanned, beside their whole
process CPU in both runs. A kvstore the schedule killed or restarted starts its counters again, so these
are the figures since its last start.
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
            f"  {w['label']:44s} {w['start']:7.1f}-{w['end']:7.1f}s {w['ops']:6d} ops {100 * w['failed_share']:6.2f}%"
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


def _kvstore_sums(result: dict[str, Any]) -> dict[str, float]:
    """The kvstores' figures (``Run.notes["kvstores"]``) summed over the kvstores."""
    sums: dict[str, float] = {}
    for figures in result.get("kvstores", {}).values():
        for name, value in figures.items():
            sums[name] = sums.get(name, 0.0) + value
    return sums


def _p99s(result: dict[str, Any], ops: Sequence[Op]) -> tuple[float | None, float | None]:
    clients = [op for op in ops if op.client not in ("final", "setup")]
    windows = [(e["start"], e["end"]) for e in result["events"]]
    return (
        percentile(_latencies(clients, windows, False), 0.99),
        percentile(_latencies(clients, windows, True), 0.99),
    )


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def compare(
    interval: float, result: dict[str, Any], ops: Sequence[Op], baseline: dict[str, Any], base_ops: Sequence[Op]
) -> str:
    """Anti-entropy's cost: the run with it against the same seed without it, as lines of text."""
    with_calm, with_faulted = _p99s(result, ops)
    base_calm, base_faulted = _p99s(baseline, base_ops)
    sums, base_sums = _kvstore_sums(result), _kvstore_sums(baseline)
    compared = sums.get("antientropy_keys_compared_total", 0.0)
    scanned = sums.get("antientropy_keys_scanned_total", 0.0)
    cpu = sums.get("antientropy_cpu_seconds_total", 0.0)

    def healed(body: dict[str, Any]) -> str:
        if body.get("heal_to_replication") is not None:
            return f"{body['heal_to_replication']:.1f} s"
        return (
            f"not reached within {body.get('convergence', 0):g} s "
            f"({body['under_replicated']} of {body['replicas_checked']} keys on fewer than N replicas)"
        )

    def per(count: float) -> str:
        return f"{1e6 * cpu / count:.1f} us" if count else "-"

    lines = [
        f"anti-entropy every {interval:g} s, against the same seed without it:",
        f"  foreground p99 outside faults: {_ms(with_calm)} with, {_ms(base_calm)} without "
        f"({_ratio(with_calm, base_calm)})",
        f"  foreground p99 during faults:  {_ms(with_faulted)} with, {_ms(base_faulted)} without "
        f"({_ratio(with_faulted, base_faulted)})",
        f"  heal to full replication: {healed(result)} with, {healed(baseline)} without",
        f"  kvstores that ran to the end: {sums.get('antientropy_passes_total', 0):.0f} passes, "
        f"{compared:.0f} keys compared, {scanned:.0f} scanned, "
        f"{sums.get('antientropy_keys_repaired_total', 0):.0f} repaired",
        f"  anti-entropy CPU: {cpu:.2f} s, {per(compared)} per key compared, {per(scanned)} per key scanned "
        f"(their processes: {sums.get('process_cpu_seconds', 0):.1f} s with, "
        f"{base_sums.get('process_cpu_seconds', 0):.1f} s without)",
    ]
    return "\n".join(lines)


def _run(args: argparse.Namespace, workdir: Path, interval: float) -> tuple[dict[str, Any], list[Op]] | None:
    """One run of the schedule with anti-entropy every ``interval`` seconds (0: off); None if it broke."""
    runner_args = [
        "--seed", str(args.seed),
        "--length", str(args.length),
        "--report", "under-replicated",
        "--convergence", str(args.convergence),
        "--workdir", str(workdir),
        *(["--faults", args.faults] if args.faults else []),
        f"--kvstore-arg=--anti-entropy-interval={interval:g}",
        *(f"--kvstore-arg={a}" for a in args.kvstore_arg),
    ]  # fmt: skip
    result = run_in_namespace(runner_args, ROOT, timeout=args.length * 4 + args.convergence + 900)
    path = workdir / "result.json"
    if not path.exists():
        sys.stdout.write(result.stdout[-6000:])
        print(f"the run failed (status {result.returncode})", file=sys.stderr)
        return None
    return json.loads(path.read_text()), read_history(workdir / "history.jsonl")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--length", type=float, default=150.0, help="seconds of faults to schedule")
    p.add_argument("--faults", default="", help="comma-separated faults (default: all)")
    p.add_argument("--convergence", type=float, default=120.0, help="longest wait for full replication")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--kvstore-arg", action="append", default=[], help="an option for every kvstore (repeatable)")
    p.add_argument("--anti-entropy-interval", type=float, default=10.0, help="the kvstores' anti-entropy interval")
    p.add_argument("--no-baseline", action="store_true", help="skip the run without anti-entropy")
    args = p.parse_args(argv)
    reason = preflight()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return SKIP_STATUS
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chashd-bench-faults-"))
    run = _run(args, workdir / "with", args.anti_entropy_interval)
    if run is None:
        return 2
    body, ops = run
    print(report(body, ops))
    if not args.no_baseline:
        baseline = _run(args, workdir / "without", 0.0)
        if baseline is None:
            return 2
        print(compare(args.anti_entropy_interval, body, ops, *baseline))
    print(f"history, events and logs: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
