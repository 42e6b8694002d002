"""Run a fault-injection schedule (or one of the regression scenarios) against a real cluster, and check it.

    python -m tests.faults.runner --seed 7 --length 600            # every fault, ten minutes
    python -m tests.faults.runner --seed 7 --faults kill,pause      # only these faults
    python -m tests.faults.runner --scenario rmw-stale-primary      # a deterministic regression scenario
    python -m tests.faults.runner --check /tmp/chashd-faults-xyz    # check a finished run's history again

Run from the repository's root with the virtual environment's Python (``.venv/bin/python``), as root. The
runner re-executes itself in a private network and PID namespace (``tests.faults.netns``); inside, it starts
3 gateways and 4 SQLite kvstores, sets the counters, starts the clients (writers and readers through every
gateway), warms up, runs the schedule, heals everything, lets the clients run a little longer, waits until
the cluster settles, waits (up to ``--convergence`` seconds after the heal) for every key to be on N
replicas, reads every key through the gateways, and checks the history (``tests.faults.checker``).

It writes ``history.jsonl``, ``events.jsonl``, ``result.json`` and the daemons' logs into ``--workdir`` (a new
temporary directory by default, kept), prints a summary, and exits 0 when nothing was violated, 1 when
something was, 2 when the run itself failed (a daemon that would not start), 77 when this machine cannot
run it (the message says why).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from chashd.launcher import clean_environ
from chashd.record import Record
from tests.faults.checker import CATEGORIES, ReplicaState, Report, Violation, check
from tests.faults.clients import (
    DEFAULT_MIX,
    Endpoint,
    Session,
    Worker,
    Workload,
    counter_keys,
    parse_mix,
    set_up_counters,
)
from tests.faults.cluster import FaultCluster, RingView
from tests.faults.history import Event, Op, Recorder, read_events, read_history, write_events, write_history
from tests.faults.nemesis import FAULTS, Nemesis, Step, make_schedule
from tests.faults.netns import SKIP_STATUS, Firewall, bring_loopback_up, preflight, run_in_namespace
from tests.faults.stats import availability

__all__ = ["ROOT", "Run", "main", "parse_args"]

ROOT = Path(__file__).resolve().parents[2]
VIOLATED = 1
BROKEN = 2


class Interrupted(Exception):
    """The runner was told to stop (SIGTERM)."""


class Run:
    """One run inside the namespace: the cluster, the firewall, the recorder, and the checks at the end."""

    def __init__(self, workdir: Path, host_namespace: str, args: argparse.Namespace) -> None:
        self.workdir = workdir
        self.args = args
        self.recorder = Recorder()
        self.firewall = Firewall(host_namespace)
        self.stop = threading.Event()
        self.cluster: FaultCluster | None = None
        self.events: list[Event] = []
        self.schedule: list[Step] = []
        self.heal_time: float | None = None
        started = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.recorder.wall_origin))
        self.notes: dict[str, Any] = {"started": started + f".{int(self.recorder.wall_origin % 1 * 1000):03d}Z"}
        self._log = open(workdir / "run.log", "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.log(f"0 s of the run's clock is {self.notes['started']} (the daemons' logs are in UTC)")

    def log(self, line: str) -> None:
        """Print a line and keep it in ``run.log``."""
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    # -- the cluster --------------------------------------------------------------------------------

    def gateway_args(self, dead_after: float | None = None) -> list[str]:
        """The gateways' options of a run: quick failure detection, the run's removal delay."""
        a = self.args
        return [
            "--probe-interval", str(a.probe_interval),
            "--down-after", str(a.down_after),
            "--dead-after", str(a.dead_after if dead_after is None else dead_after),
        ]  # fmt: skip

    def start_cluster(
        self, kvstores: int = 4, gateway_args: Sequence[str] = (), kvstore_args: Sequence[str] = ()
    ) -> FaultCluster:
        """Mark the daemons' connections, start the cluster and wait until it is ready."""
        self.firewall.setup(FaultCluster.all_members())
        self.cluster = FaultCluster(
            self.workdir,
            kvstores=kvstores,
            gateway_args=[*gateway_args, *self.args.gateway_arg],
            kvstore_args=["--drain-timeout", "60", *kvstore_args, *self.args.kvstore_arg],
            env=clean_environ(),
        )
        started = time.monotonic()
        self.cluster.start(timeout=120.0)
        self.log(f"cluster up in {time.monotonic() - started:.1f}s:\n{self.cluster.describe()}")
        return self.cluster

    def endpoints(self) -> list[Endpoint]:
        """The gateways' memcached ports."""
        assert self.cluster is not None
        return [Endpoint(g.name, *self.cluster.line_address(g)) for g in self.cluster.gateways]

    def session(self, name: str, first: int = 0) -> Session:
        """A client session starting at gateway number ``first``."""
        return Session(name, self.endpoints(), self.recorder, self.args.op_timeout, first)

    # -- the end of a run -----------------------------------------------------------------------------

    def written_keys(self) -> list[str]:
        """Every key some operation may have written."""
        return sorted({op.key for op in self.recorder.ops() if op.kind != "get"})

    def replica_states(self, keys: Sequence[str], view: RingView | None = None) -> list[ReplicaState]:
        """What the kvstores of each key's preference list hold now, read directly."""
        assert self.cluster is not None
        view = view or self.cluster.ring_view()
        held = self.cluster.records(keys)
        at = self.recorder.now()
        states = []
        for key in keys:
            newest: Record | None = None
            for records in held.values():
                record = records.get(key)
                if record is not None and record.newer_than(newest):
                    newest = record
            preference = view.preference(key)
            holders = tuple(
                n for n in preference if newest is not None and n in held and held[n].get(key, None) == newest
            )
            value = None if newest is None or newest.tombstone else newest.value.decode()
            states.append(
                ReplicaState(
                    key,
                    len(preference),
                    None if newest is None else str(newest.version),
                    value,
                    holders,
                    tuple(n for n in preference if n not in holders),
                    at,
                )
            )
        return states

    def wait_replicated(self, keys: Sequence[str], until: float) -> tuple[list[ReplicaState], float | None]:
        """Read the replicas until every key is on N of them or the run's clock passes ``until`` (checked
        at least once). Returns the last states and when (on the run's clock) all were replicated."""
        while True:
            states = self.replica_states(keys)
            if all(s.replicated for s in states):
                return states, self.recorder.now()
            if self.recorder.now() >= until or self.stop.is_set():
                return states, None
            self.stop.wait(1.0)

    def final_reads(self, keys: Iterable[str]) -> None:
        """Read every key through the gateways (in turn), as the client ``final``; a read that fails is
        tried again at the next gateway, three times at most."""
        sessions = [self.session("final", i) for i in range(len(self.endpoints()))]
        try:
            for i, key in enumerate(keys):
                for attempt in range(3):
                    if sessions[(i + attempt) % len(sessions)].run("get", key).outcome == "ok":
                        break
        finally:
            for session in sessions:
                session.close()

    def finish(self, extra: Sequence[Violation] = ()) -> Report:
        """Settle, wait for replication, read everything, check, write the files; the report."""
        assert self.cluster is not None
        a = self.args
        violations = list(extra)
        started = time.monotonic()
        reason = self.cluster.settle(a.settle_timeout)
        self.notes["settle_seconds"] = round(time.monotonic() - started, 1)
        if reason is not None:
            self.log(f"the cluster did not settle within {a.settle_timeout:g}s: {reason}")
            violations.append(
                Violation("liveness", "-", f"the cluster did not settle within {a.settle_timeout:g}s: {reason}")
            )
        else:
            self.log(f"settled in {self.notes['settle_seconds']}s")
        heal = self.heal_time if self.heal_time is not None else self.recorder.now()
        keys = self.written_keys()
        states, replicated_at = self.wait_replicated(keys, heal + a.convergence)
        self.notes["convergence"] = a.convergence
        self.notes["heal_to_replication"] = None if replicated_at is None else round(replicated_at - heal, 1)
        self.notes["kvstores"] = self.cluster.kvstore_figures()
        under = sum(1 for s in states if not s.replicated)
        self.log(
            f"replication: {len(states) - under} of {len(states)} keys on N replicas "
            + (
                f"{self.notes['heal_to_replication']}s after the heal"
                if replicated_at is not None
                else f"{a.convergence:g}s after the heal"
            )
        )
        self.final_reads(keys)
        report = check(self.recorder.ops(), states, a.margin, report_only=self.report_only(), extra=violations)
        self.write(report)
        return report

    def report_only(self) -> list[str]:
        """The categories this run only reports (``--report``)."""
        return [c for c in self.args.report.split(",") if c]

    def write(self, report: Report) -> None:
        """Write the history, the events and ``result.json``; print the summary."""
        ops = self.recorder.ops()
        write_history(self.workdir / "history.jsonl", ops)
        write_events(self.workdir / "events.jsonl", self.events)
        windows = availability(ops, self.events)
        result = {
            "seed": self.args.seed,
            "scenario": self.args.scenario,
            "faults": self.args.faults,
            "schedule": [s.to_json() for s in self.schedule],
            "events": [e.to_json() for e in self.events],
            "ok": report.ok,
            "counts": report.counts,
            "violations": [
                {"category": v.category, "key": v.key, "message": v.message, "ops": list(v.ops)}
                for v in report.violations
            ],
            "categories": {c: len(v) for c, v in report.by_category().items()},
            "reported": {c: len(v) for c, v in report.by_category(reported=True).items()},
            "report_only": self.report_only(),
            "replicas_checked": report.replicas_checked,
            "under_replicated": len(report.under_replicated),
            "availability": [w.to_json() for w in windows],
            **self.notes,
        }
        (self.workdir / "result.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        self.log("availability (share of operations that failed or timed out):")
        for w in windows:
            self.log(f"  {w.label:44s} {w.start:7.1f}-{w.end:7.1f}s {w.ops:6d} ops {100 * w.failed_share:5.1f}%")
        self.log(report.summary())
        self.log(f"history, events, result.json and logs: {self.workdir}")

    def close(self) -> None:
        """Stop every daemon (each by its pid) and remove every cut."""
        self.stop.set()
        try:
            if self.cluster is not None:
                self.cluster.stop(timeout=20.0)
        finally:
            try:
                self.firewall.heal()
            finally:
                self._log.close()


def run_schedule(run: Run) -> Report:
    """The seeded schedule with clients running throughout."""
    a = run.args
    faults = a.faults.split(",") if a.faults else list(FAULTS)
    low, _, high = a.rest.partition(",")
    rest = (float(low), float(high or low))
    run.schedule = make_schedule(a.seed, faults, a.length, rest=rest, dead_after=a.dead_after)
    run.log(
        f"seed {a.seed}: {len(run.schedule)} steps: " + ", ".join(f"{s.fault}({s.duration:g}s)" for s in run.schedule)
    )
    cluster = run.start_cluster(gateway_args=run.gateway_args())
    workload = Workload(
        registers=a.registers,
        counters=a.counters,
        writers=a.writers,
        readers=a.readers,
        mix=parse_mix(a.mix) if a.mix else dict(DEFAULT_MIX),
        timeout=a.op_timeout,
    )
    setup = run.session("setup")
    set_up_counters(setup, counter_keys(workload))
    setup.close()
    clients_stop = threading.Event()
    workers = [
        Worker(
            f"{'w' if i < workload.writers else 'r'}{i}",
            i < workload.writers,
            run.session(f"{'w' if i < workload.writers else 'r'}{i}", i),
            workload,
            a.seed * 1000 + i,
            clients_stop,
        )
        for i in range(workload.writers + workload.readers)
    ]
    for worker in workers:
        worker.start()
    try:
        run.stop.wait(a.warmup)
        nemesis = Nemesis(cluster, run.firewall, run.recorder.now, run.log, run.stop, a.dead_after)
        try:
            nemesis.run(run.schedule)
        finally:
            run.events = nemesis.events
            findings = nemesis.findings
        run.heal_time = run.recorder.now()
        run.log(f"{run.heal_time:7.1f}s every fault healed")
        run.stop.wait(a.cooldown)
    finally:
        clients_stop.set()
        for worker in workers:
            worker.join(a.op_timeout + 10.0)
    return run.finish(findings)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The runner's options."""
    p = argparse.ArgumentParser(prog="python -m tests.faults.runner", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1, help="seeds the schedule and the clients' choices (default 1)")
    p.add_argument("--length", type=float, default=120.0, help="seconds of faults to schedule (default 120)")
    p.add_argument(
        "--faults", default="", help=f"comma-separated faults to draw from (default all: {','.join(FAULTS)})"
    )
    p.add_argument(
        "--scenario", default="", help="run a regression scenario instead: rmw-stale-primary, removed-restart"
    )
    p.add_argument("--workdir", type=Path, default=None, help="where files and logs go (default: a new temp dir)")
    p.add_argument("--writers", type=int, default=4)
    p.add_argument("--readers", type=int, default=2)
    p.add_argument("--registers", type=int, default=200, help="keys that are set, added, deleted and read")
    p.add_argument("--counters", type=int, default=10, help="keys that are incremented and read")
    p.add_argument("--op-timeout", type=float, default=8.0, help="a client operation's timeout (default 8 s)")
    p.add_argument("--rest", default="3,8", help="the calm after each heal: MIN,MAX seconds (default 3,8)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of load before the first fault")
    p.add_argument("--cooldown", type=float, default=5.0, help="seconds of load after the last heal")
    p.add_argument("--probe-interval", type=float, default=0.5, help="the gateways' --probe-interval")
    p.add_argument("--down-after", type=int, default=3, help="the gateways' --down-after")
    p.add_argument("--dead-after", type=float, default=15.0, help="the gateways' --dead-after")
    p.add_argument("--settle-timeout", type=float, default=180.0, help="longest wait for the cluster to settle")
    p.add_argument(
        "--convergence",
        type=float,
        default=90.0,
        help="seconds after the heal within which every key must be on N replicas (default 90: USAGE.md's bound, "
        "one anti-entropy interval of the kvstores, 60 s by default, plus a pass)",
    )
    p.add_argument(
        "--report",
        default="",
        help=f"comma-separated categories to report without failing the run (of {','.join(CATEGORIES)})",
    )
    p.add_argument(
        "--mix",
        default="",
        help="the writers' operations and weights, e.g. set=45,fresh=15,delete=15,get=25 (default: "
        + ",".join(f"{k}={int(100 * v)}" for k, v in DEFAULT_MIX.items())
        + ")",
    )
    p.add_argument("--gateway-arg", action="append", default=[], help="one more gateway option (repeatable)")
    p.add_argument("--kvstore-arg", action="append", default=[], help="one more kvstore option (repeatable)")
    p.add_argument("--margin", type=float, default=0.005, help="writes closer than this count as concurrent")
    p.add_argument("--timeout", type=float, default=3600.0, help="longest the whole run may take")
    p.add_argument("--check", type=Path, default=None, help="check the history of a finished run in this directory")
    p.add_argument("--inside", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def check_again(workdir: Path, margin: float) -> int:
    """Check a finished run's history (its replicas' state is not kept: the history alone)."""
    ops: list[Op] = read_history(workdir / "history.jsonl")
    events = read_events(workdir / "events.jsonl")
    report = check(ops, margin=margin)
    for window in availability(ops, events):
        print(f"  {window.label:44s} {window.ops:6d} ops {100 * window.failed_share:5.1f}% failed")
    print(report.summary())
    return 0 if report.ok else VIOLATED


def _interrupted(signum: int, frame: Any) -> NoReturn:
    raise Interrupted(f"signal {signum}")


def inside(args: argparse.Namespace, scenario: Callable[[Run], Report] | None) -> int:
    """The part that runs in the namespace."""
    signal.signal(signal.SIGTERM, _interrupted)
    bring_loopback_up()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chashd-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    run = Run(workdir, args.inside, args)
    try:
        report = scenario(run) if scenario is not None else run_schedule(run)
    except (Interrupted, KeyboardInterrupt) as e:
        run.log(f"stopped: {e}")
        return BROKEN
    except Exception:
        run.log("the run failed:\n" + traceback.format_exc())
        return BROKEN
    finally:
        run.close()
    return 0 if report.ok else VIOLATED


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: outside the namespace, check the machine and re-execute inside one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.check is not None:
        return check_again(args.check, args.margin)
    scenario = None
    if args.scenario:
        from tests.faults.scenarios import SCENARIOS

        if args.scenario not in SCENARIOS:
            print(f"unknown scenario {args.scenario!r}; choose among {', '.join(SCENARIOS)}", file=sys.stderr)
            return BROKEN
        scenario = SCENARIOS[args.scenario]
    if args.inside:
        return inside(args, scenario)
    reason = preflight()
    if reason is not None:
        print(f"SKIP: {reason}", flush=True)
        return SKIP_STATUS
    return run_in_namespace(argv, ROOT, args.timeout, echo=True).returncode


if __name__ == "__main__":
    sys.exit(main())
