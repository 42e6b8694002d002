"""The nemesis: faults injected into a running cluster, one at a time, from a seeded schedule.

Faults (``FAULTS``), each followed by its heal:

- ``kill``: kill -9 a kvstore, restart it after the duration (same data directory);
- ``pause``: SIGSTOP a kvstore, SIGCONT after the duration;
- ``kill-leader``: kill -9 the Raft leader gateway, restart it after the duration;
- ``partition-kvstore``: cut a kvstore from every gateway and kvstore (iptables), heal after the duration;
- ``partition-gateway``: cut a gateway (the leader, or a follower) from the other gateways and every kvstore
  (clients still reach it); a cut leader that still says it leads at the heal is a ``leadership`` finding;
- ``join``: start a kvstore never started before (while a slot is free); it stays;
- ``drain``: SIGTERM a kvstore (it hands its data off and exits), start it again after the duration;
- ``remove``: kill -9 a kvstore and wait until the gateways' ``--dead-after`` removes it from the ring,
  start it again after the duration.

A schedule (``make_schedule``) is a list of ``Step`` drawn from ``random.Random(seed)``: the fault, which
target (an index into the candidates sorted by name, or the leader), how long it lasts and the calm after
its heal. The same seed and options give the same schedule; which daemon a step hits follows from the
cluster's state when it runs, which the schedule itself decides (joins and who leads aside).
"""

from __future__ import annotations

import random
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from chashd.launcher import Daemon
from tests.faults.checker import Violation
from tests.faults.cluster import FaultCluster, poll_until
from tests.faults.history import Event
from tests.faults.netns import Firewall

__all__ = ["DURATIONS", "FAULTS", "LEADERSHIP_GRACE", "Nemesis", "Step", "leadership_violation", "make_schedule"]

FAULTS = (
    "kill",
    "pause",
    "kill-leader",
    "partition-kvstore",
    "partition-gateway",
    "join",
    "drain",
    "remove",
)

#: Each fault's duration range in seconds (for ``remove``: how long it stays out once removed).
DURATIONS: dict[str, tuple[float, float]] = {
    "kill": (2.0, 8.0),
    "pause": (1.0, 6.0),
    "kill-leader": (2.0, 6.0),
    "partition-kvstore": (3.0, 10.0),
    "partition-gateway": (3.0, 10.0),
    "join": (0.0, 0.0),
    "drain": (2.0, 6.0),
    "remove": (2.0, 6.0),
}


@dataclass(frozen=True)
class Step:
    """One fault of a schedule."""

    fault: str
    pick: int
    duration: float
    rest: float

    def to_json(self) -> dict[str, Any]:
        """A plain dict for ``json.dumps``."""
        return asdict(self)


def make_schedule(
    seed: int,
    faults: Sequence[str],
    length: float,
    kvstores: int = 4,
    slots: int = 5,
    rest: tuple[float, float] = (3.0, 8.0),
    dead_after: float = 10.0,
) -> list[Step]:
    """A seeded schedule of ``faults`` whose expected time (durations, rests, and ``dead_after`` for each
    removal) reaches ``length`` seconds. A ``join`` is drawn only while a kvstore slot is free."""
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown or not faults:
        raise ValueError(f"unknown faults {unknown}; choose among {', '.join(FAULTS)}")
    rng = random.Random(seed)
    steps: list[Step] = []
    elapsed = 0.0
    count = kvstores
    while elapsed < length:
        allowed = [f for f in faults if f != "join" or count < slots]
        if not allowed:
            break
        fault = rng.choice(allowed)
        low, high = DURATIONS[fault]
        step = Step(fault, rng.randrange(1000), round(rng.uniform(low, high), 1), round(rng.uniform(*rest), 1))
        steps.append(step)
        if fault == "join":
            count += 1
        elapsed += step.duration + step.rest + (dead_after if fault == "remove" else 0.0) + 2.0
    return steps


#: Longer than an election takes (pysyncobj: a random 0.4-1.4 s after the last heartbeat, then a vote round):
#: a leader cut from the others this long must have stopped saying it leads.
LEADERSHIP_GRACE = 3.0


def leadership_violation(
    gateway: str, cut_for: float, status: Mapping[str, Any] | None, leader: bool = True
) -> Violation | None:
    """A ``leadership`` violation when ``gateway``, cut from the other gateways for ``cut_for`` seconds (longer
    than ``LEADERSHIP_GRACE``), still answers ``GET /ring/status`` saying it leads, or, a follower
    (``leader`` False), that its map is current or that a leader leads (it heard from no leader meanwhile:
    the leader it last knew is ``last_leader`` then, not ``leader``). Pure."""
    if cut_for < LEADERSHIP_GRACE or status is None:
        return None
    if not leader:
        if status.get("map_current") is True or status.get("leader") is not None:
            return Violation(
                "leadership",
                gateway,
                f"{gateway}, a follower cut from the other gateways for {cut_for:.1f}s, still reports its map "
                f"current ({status.get('map_current')!r}) or a leader ({status.get('leader')!r})",
            )
        return None
    if status.get("is_leader") or status.get("leader") == gateway:
        return Violation(
            "leadership",
            gateway,
            f"{gateway}, cut from the other gateways for {cut_for:.1f}s, still reports itself leader "
            f"(is_leader {status.get('is_leader')}, leader {status.get('leader')!r})",
        )
    return None


class Nemesis:
    """Runs a schedule against ``cluster``; ``events`` records each fault with the daemon it hit.

    ``now()`` is the run's clock (the recorder's), ``log`` prints a line; ``stop`` ends the schedule early.
    Every wait is bounded; a daemon that does not come back within ``restart_timeout`` raises.
    """

    def __init__(
        self,
        cluster: FaultCluster,
        firewall: Firewall,
        now: Callable[[], float],
        log: Callable[[str], None],
        stop: threading.Event,
        dead_after: float,
        drain_timeout: float = 60.0,
        restart_timeout: float = 60.0,
    ) -> None:
        self.cluster = cluster
        self.firewall = firewall
        self.now = now
        self.log = log
        self.stop = stop
        self.dead_after = dead_after
        self.drain_timeout = drain_timeout
        self.restart_timeout = restart_timeout
        self.events: list[Event] = []
        #: What the nemesis saw go wrong itself (a cut leader that still says it leads).
        self.findings: list[Violation] = []
        self._paused: set[str] = set()
        self._begin: dict[str, Callable[[Step], tuple[str, Callable[[], str]]]] = {
            "kill": self._kill,
            "pause": self._pause,
            "kill-leader": self._kill_leader,
            "partition-kvstore": self._partition_kvstore,
            "partition-gateway": self._partition_gateway,
            "join": self._join,
            "drain": self._drain,
            "remove": self._remove,
        }

    def run(self, schedule: Sequence[Step]) -> list[Event]:
        """Inject every step in turn (until ``stop``); the cluster is healed at the end, also on error."""
        try:
            for step in schedule:
                if self.stop.is_set():
                    break
                self.inject(step)
        finally:
            self.heal_all()
        return self.events

    def inject(self, step: Step) -> Event:
        """One fault: begin, wait its duration, heal, then rest."""
        start = self.now()
        target, heal = self._begin[step.fault](step)
        self.log(f"{start:7.1f}s {step.fault} {target} for {step.duration:g}s")
        self.stop.wait(step.duration)
        note = heal()
        event = Event(step.fault, target, start, self.now(), note)
        self.events.append(event)
        self.log(f"{event.end:7.1f}s healed {step.fault} {target}{': ' + note if note else ''}")
        self.stop.wait(step.rest)
        return event

    def heal_all(self) -> None:
        """Undo every fault: remove the cuts, resume paused processes, start every daemon that is not
        running (a drained or removed kvstore comes back)."""
        self.firewall.heal()
        for daemon in self.cluster.gateways + self.cluster.kvstores:
            if daemon.name in self._paused:
                daemon.signal(signal.SIGCONT)
        self._paused.clear()
        for daemon in self.cluster.gateways + self.cluster.kvstores:
            if not daemon.running():
                self._restart(daemon)

    # -- targets ------------------------------------------------------------------------------------

    def _kvstore(self, step: Step) -> Daemon:
        candidates = sorted(self.cluster.running_kvstores(), key=lambda d: d.name)
        if not candidates:
            raise RuntimeError("no kvstore is running")
        return candidates[step.pick % len(candidates)]

    def _restart(self, daemon: Daemon, note: str = "") -> str:
        """Start ``daemon`` again (when it is not running) and wait until it answers; ``note`` + restarted."""
        if not daemon.running():
            daemon.start()
            daemon.wait_healthy(self.restart_timeout)
        return f"{note}; restarted" if note else "restarted"

    def _others(self, daemon: Daemon) -> list[Any]:
        me = self.cluster.member(daemon)
        return [m for m in self.cluster.all_members(len(self.cluster.gateways)) if m != me]

    # -- the faults ---------------------------------------------------------------------------------

    def _kill(self, step: Step) -> tuple[str, Callable[[], str]]:
        target = self._kvstore(step)
        target.kill()
        return target.name, lambda: self._restart(target)

    def _pause(self, step: Step) -> tuple[str, Callable[[], str]]:
        target = self._kvstore(step)
        target.signal(signal.SIGSTOP)
        self._paused.add(target.name)

        def heal() -> str:
            target.signal(signal.SIGCONT)
            self._paused.discard(target.name)
            return "resumed"

        return target.name, heal

    def _kill_leader(self, step: Step) -> tuple[str, Callable[[], str]]:
        leader = poll_until("a Raft leader", self.cluster.leader, 30.0)
        assert isinstance(leader, Daemon)
        leader.kill()
        return leader.name, lambda: self._restart(leader)

    def _partition(self, target: Daemon) -> Callable[[], str]:
        self.firewall.isolate(self.cluster.member(target), self._others(target))

        def heal() -> str:
            self.firewall.heal()
            return "reconnected"

        return heal

    def _partition_kvstore(self, step: Step) -> tuple[str, Callable[[], str]]:
        target = self._kvstore(step)
        return target.name, self._partition(target)

    def _partition_gateway(self, step: Step) -> tuple[str, Callable[[], str]]:
        """Cut a gateway from the others and from every kvstore: the leader for an even ``pick`` (when one
        is known), else one of the gateways by ``pick``. A cut leader must stop saying it leads, a cut
        follower that its map is current."""
        gateways = sorted(self.cluster.gateways, key=lambda d: d.name)
        leader = self.cluster.leader()
        target = leader if leader is not None and step.pick % 2 == 0 else gateways[step.pick // 2 % len(gateways)]
        started = self.now()
        reconnect = self._partition(target)

        def heal() -> str:
            status = self.cluster.gateway_status(target)
            finding = leadership_violation(target.name, self.now() - started, status, leader=target is leader)
            if finding is not None:
                self.findings.append(finding)
            return reconnect()

        return f"{target.name}{' (leader)' if target is leader else ''}", heal

    def _join(self, step: Step) -> tuple[str, Callable[[], str]]:
        name = self.cluster.spare_kvstore()
        if name is None:
            return "none", lambda: "no free kvstore slot"
        daemon = self.cluster.add_kvstore(name, wait=False)
        daemon.wait_healthy(self.restart_timeout)
        return name, lambda: "joined"

    def _drain(self, step: Step) -> tuple[str, Callable[[], str]]:
        target = self._kvstore(step)
        target.signal(signal.SIGTERM)
        status = target.wait(self.drain_timeout)
        if status is None:
            target.kill()
            note = f"did not finish its drain within {self.drain_timeout:g}s: killed"
        else:
            note = f"drained (exit status {status})"
        return target.name, lambda: self._restart(target) or f"{note}; restarted"

    def _remove(self, step: Step) -> tuple[str, Callable[[], str]]:
        target = self._kvstore(step)
        target.kill()

        def removed() -> bool:
            leader = self.cluster.leader()
            nodes = self.cluster.ring_nodes(leader) if leader is not None else None
            return nodes is not None and target.name not in nodes

        try:
            poll_until(f"{target.name} to be removed from the ring", removed, self.dead_after + 60.0, 0.5)
            note = "removed"
        except TimeoutError:
            note = "was not removed"
        return target.name, lambda: self._restart(target) or f"{note}; restarted"
