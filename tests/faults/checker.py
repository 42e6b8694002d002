"""The checker: what a history of client operations (and the replicas' final state) says went wrong.

Pure: it reads ``Op`` records and ``ReplicaState`` snapshots, never the network or a clock.

The model is chashd's: every write gets a version from the gateway's clock while the client waits for it
(between the operation's ``invoke`` and ``complete``), and replicas keep the highest version (last writer
wins). So if a write B was invoked more than ``margin`` after a write A completed, B's version is higher
and A can never be the state a read sees once B is acknowledged. ``margin`` (5 ms) covers the clock's
millisecond resolution: two gateways issuing versions within the same millisecond may order them either way,
which the design allows, so writes closer than that count as concurrent.

Each operation gives the checker *effects* and *claims*:

- ``set``/``add`` answered ``STORED`` is a certain effect (its unique value), ``delete`` answered
  ``DELETED`` a certain tombstone. A failed or indeterminate one is a *possible* effect: a write that
  missed its quorum may still sit on a replica and come back through read repair, so it may be seen but
  need not be. A failed one got its version before the error came back (its window ends at ``complete``);
  an indeterminate one may have got it at any time after ``invoke``.
- A ``get`` claims the key held the value it read (or nothing); ``add`` answered ``STORED`` and ``delete``
  answered ``NOT_FOUND`` claim the key was absent; ``add`` answered ``NOT_STORED`` and ``delete`` answered
  ``DELETED`` claim it was present. A claim is *contradicted* when some certain effect that is not a source
  of the claim completed before the claiming operation started, and every effect that could be a source
  of the claim is definitely older than it. Indeterminate effects are never definitely older, so an
  indeterminate write is allowed either way.

Contradicted claims are reported as ``stale-read`` (a ``get`` during the run), ``lost-write`` or
``undone-delete`` (the final reads through the gateways and the newest record the kvstores hold), and
``rmw`` (a read-modify-write answered as no single memcached would have for the acknowledged history).
Counters (keys that see ``incr``; the workload sets them to 0 once, then only increments and reads them)
have rules of their own: an acknowledged ``incr`` answers a number no other acknowledged ``incr`` of the
key answered, and never less than one acknowledged before it started; ``NOT_FOUND`` is never right; a read
never returns less than an increment acknowledged before it started; the final value lies between the
acknowledged increments and those plus the ones that may have applied. ``phantom`` is a value no write
could have produced. ``under-replicated`` is a key whose newest record sits on fewer than N of the nodes of
its preference list. ``leadership`` (a leader cut from the other gateways that still says it leads, a cut follower that
still says its map is current or names a leader) and
``liveness`` (a cluster that does not settle) come from the runner. A run may name categories it only
reports (``report_only``): they are listed and counted but do not make the run fail (``Report.reported``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from tests.faults.history import FAIL, INFO, OK, Op

__all__ = ["CATEGORIES", "ReplicaState", "Report", "Violation", "check"]

#: Every kind of violation, in the order the summary lists them.
CATEGORIES = (
    "lost-write",
    "undone-delete",
    "stale-read",
    "rmw",
    "phantom",
    "under-replicated",
    "leadership",
    "liveness",
)

_INF = float("inf")
_FINAL = "final"
_REPLICAS = "replicas"


@dataclass(frozen=True)
class Violation:
    """One thing that went wrong: its category, the key, a sentence, and the operations involved."""

    category: str
    key: str
    message: str
    ops: tuple[int, ...] = ()


@dataclass(frozen=True)
class ReplicaState:
    """What the kvstores held for one key when read directly (after the run), at time ``at``.

    ``version``/``value``: the newest record any kvstore holds (``value`` None for a tombstone; both None
    when no kvstore has a record); ``holders``/``missing``: the nodes of the key's preference list that
    hold that version, and those that do not; ``wanted`` is N for that ring.
    """

    key: str
    wanted: int
    version: str | None
    value: str | None
    holders: tuple[str, ...]
    missing: tuple[str, ...]
    at: float

    @property
    def replicated(self) -> bool:
        """True when the newest record is on ``wanted`` nodes of the preference list (or when no kvstore
        holds a record: nothing to replicate; a lost acknowledged write is reported as such)."""
        return self.version is None or len(self.holders) >= self.wanted


@dataclass(frozen=True)
class Report:
    """The checker's verdict: ``violations`` fail the run, ``reported`` are of the categories the run only
    reports."""

    violations: tuple[Violation, ...]
    counts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    under_replicated: tuple[ReplicaState, ...] = ()
    replicas_checked: int = 0
    reported: tuple[Violation, ...] = ()

    @property
    def ok(self) -> bool:
        """True when nothing was violated (reported categories aside)."""
        return not self.violations

    def by_category(self, reported: bool = False) -> dict[str, list[Violation]]:
        """The violations (or, with ``reported``, the reported ones) grouped by category, in ``CATEGORIES``
        order."""
        groups: dict[str, list[Violation]] = {c: [] for c in CATEGORIES}
        for violation in self.reported if reported else self.violations:
            groups.setdefault(violation.category, []).append(violation)
        return {c: v for c, v in groups.items() if v}

    def summary(self, examples: int = 5) -> str:
        """A few lines for a person: operations by kind and outcome, then each category's count and
        first ``examples``."""
        lines = []
        for kind in sorted(self.counts):
            outcomes = self.counts[kind]
            parts = ", ".join(f"{outcomes.get(o, 0)} {o}" for o in (OK, FAIL, INFO))
            lines.append(f"  {kind:7s} {sum(outcomes.values()):7d}: {parts}")
        if self.replicas_checked:
            lines.append(
                f"  replication: {self.replicas_checked - len(self.under_replicated)} of {self.replicas_checked}"
                " keys on N replicas"
            )
        else:  # no replica states: a history checked again (--check) keeps none
            lines.append("  replication: not checked (no replica states)")
        groups = self.by_category()
        if not groups:
            lines.append("no violations")
        for category, violations in groups.items():
            lines.append(f"{category}: {len(violations)}")
            lines.extend(f"  {v.key}: {v.message}" for v in violations[:examples])
        for category, violations in self.by_category(reported=True).items():
            lines.append(f"{category} (reported, not a failure of this run): {len(violations)}")
            lines.extend(f"  {v.key}: {v.message}" for v in violations[:examples])
        return "\n".join(lines)


@dataclass(frozen=True)
class _Effect:
    """A write that set (or may have set) the key's state: a value, or None for a tombstone."""

    op: Op | None  # None: the key's initial absence
    state: str | None
    lo: float
    hi: float
    certain: bool


_INITIAL = _Effect(None, None, -_INF, -_INF, False)
_PRESENT = object()  # the claim "some value"


def check(
    ops: Iterable[Op],
    replicas: Sequence[ReplicaState] = (),
    margin: float = 0.005,
    report_only: Iterable[str] = (),
    extra: Iterable[Violation] = (),
) -> Report:
    """Check a history and the replicas' final state; ``extra`` adds violations found elsewhere
    (a cluster that did not settle); the categories in ``report_only`` are reported, not violations."""
    by_key: dict[str, list[Op]] = defaultdict(list)
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for op in ops:
        by_key[op.key].append(op)
        if op.client != _FINAL:
            counts[op.kind][op.outcome] += 1
    final_states = {r.key: r for r in replicas}
    violations: list[Violation] = list(extra)
    for key in sorted(by_key.keys() | final_states.keys()):
        key_ops = sorted(by_key.get(key, ()), key=lambda o: o.invoke)
        state = final_states.get(key)
        if any(op.kind == "incr" for op in key_ops):
            violations.extend(_check_counter(key, key_ops, state))
        else:
            violations.extend(_check_register(key, key_ops, state, margin))
    under = tuple(r for r in replicas if not r.replicated)
    for r in under:
        held = ", ".join(r.holders) or "none"
        violations.append(
            Violation(
                "under-replicated",
                r.key,
                f"newest version {r.version} on {len(r.holders)} of {r.wanted} replicas "
                f"(held by {held}; missing on {', '.join(r.missing)})",
            )
        )
    relaxed = frozenset(report_only)
    unknown = relaxed - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown categories {sorted(unknown)}; choose among {', '.join(CATEGORIES)}")
    return Report(
        tuple(v for v in violations if v.category not in relaxed),
        {kind: dict(c) for kind, c in counts.items()},
        under,
        len(replicas),
        tuple(v for v in violations if v.category in relaxed),
    )


# -- registers: set, add, delete, get --------------------------------------------------------------


def _effects(ops: Sequence[Op]) -> list[_Effect]:
    effects = [_INITIAL]
    for op in ops:
        if op.kind not in ("set", "add", "delete"):
            continue
        state = None if op.kind == "delete" else op.value
        if op.outcome == OK:
            if op.result in ("STORED", "DELETED"):
                effects.append(_Effect(op, state, op.invoke, op.complete, True))
        elif op.outcome == FAIL:
            effects.append(_Effect(op, state, op.invoke, op.complete, False))
        else:
            effects.append(_Effect(op, state, op.invoke, _INF, False))
    return effects


def _claim(op: Op) -> tuple[object, str] | None:
    """What an acknowledged operation says the key held when it ran: (claim, category), or None."""
    if op.outcome != OK:
        return None
    if op.kind == "get":
        final = op.client in (_FINAL, _REPLICAS)
        return op.result, "final" if final else "stale-read"
    if op.kind == "add":
        return (None if op.result == "STORED" else _PRESENT), "rmw"
    if op.kind == "delete":
        return (_PRESENT if op.result == "DELETED" else None), "rmw"
    return None


def _describe(claim: object) -> str:
    if claim is None:
        return "no value"
    if claim is _PRESENT:
        return "a value"
    return f"{claim!r}"


def _what(op: Op) -> str:
    answer = op.result if op.kind != "get" else _describe(op.result)
    if op.client == _REPLICAS:
        return f"the newest record on the kvstores (read at {op.invoke:.3f}s) holds {answer}"
    return f"{op.kind} #{op.index} ({op.client} via {op.gateway}, {op.invoke:.3f}-{op.complete:.3f}s) answered {answer}"


def _check_register(key: str, ops: Sequence[Op], state: ReplicaState | None, margin: float) -> list[Violation]:
    effects = _effects(ops)
    certain = sorted((e for e in effects if e.certain), key=lambda e: e.lo)
    observations: list[tuple[Op, object, str]] = []
    for op in ops:
        claimed = _claim(op)
        if claimed is not None:
            observations.append((op, *claimed))
    if state is not None:
        replica_op = Op(-1, _REPLICAS, "kvstores", "get", key, None, state.at, state.at, OK, state.value)
        observations.append((replica_op, state.value, "final"))
    found = []
    for op, claim, category in observations:
        violation = _contradiction(key, op, claim, category, effects, certain, margin)
        if violation is not None:
            found.append(violation)
    return found


def _sources(claim: object, effects: Sequence[_Effect], until: float) -> list[_Effect]:
    """The effects that could have left the state ``claim`` and got their version before ``until``."""
    if claim is None:
        return [e for e in effects if e.state is None and e.lo <= until]
    if claim is _PRESENT:
        return [e for e in effects if e.state is not None and e.lo <= until]
    return [e for e in effects if e.state == claim and e.lo <= until]


def _contradiction(
    key: str,
    op: Op,
    claim: object,
    category: str,
    effects: Sequence[_Effect],
    certain: Sequence[_Effect],
    margin: float,
) -> Violation | None:
    sources = _sources(claim, effects, op.complete)
    if not sources:
        category = "rmw" if claim is _PRESENT else "phantom"
        return Violation(category, key, f"{_what(op)}, which no write could have produced", (op.index,))
    # An effect that is a source itself never qualifies: its window ends after it starts.
    newest_source = max(s.hi for s in sources)
    overriding = [e for e in certain if e.hi < op.invoke and newest_source + margin < e.lo]
    if not overriding:
        return None
    newest = max(overriding, key=lambda e: e.lo)
    assert newest.op is not None  # certain effects come from operations
    acknowledged = f"{newest.op.kind} #{newest.op.index} acknowledged at {newest.op.complete:.3f}s"
    if newest.state is not None:
        acknowledged += f" ({newest.op.value!r})"
    if category == "final":
        category = "lost-write" if newest.state is not None else "undone-delete"
    refs = (op.index, newest.op.index) if op.index >= 0 else (newest.op.index,)
    return Violation(category, key, f"{_what(op)} after {acknowledged}", refs)


# -- counters: set once to 0, then incr and get ----------------------------------------------------


def _number(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _check_counter(key: str, ops: Sequence[Op], state: ReplicaState | None) -> list[Violation]:
    found: list[Violation] = []
    created = [op for op in ops if op.kind == "set" and op.outcome == OK and op.result == "STORED"]
    created_at = min((op.complete for op in created), default=_INF)
    base = min((v for v in (_number(op.value) for op in created) if v is not None), default=0)
    incrs = [op for op in ops if op.kind == "incr"]
    acknowledged = [(op, _number(op.result)) for op in incrs if op.outcome == OK and op.result != "NOT_FOUND"]
    maybe = sum(1 for op in incrs if op.outcome != OK)
    answered: dict[int, Op] = {}
    for op in incrs:
        if op.outcome != OK:
            continue
        if op.result == "NOT_FOUND":
            if created_at < op.invoke:
                found.append(Violation("rmw", key, f"{_what(op)} after the counter was set to {base}", (op.index,)))
            continue
        value = _number(op.result)
        if value is None:
            found.append(Violation("phantom", key, f"{_what(op)}, not a number", (op.index,)))
            continue
        twin = answered.get(value)
        if twin is not None:
            found.append(Violation("rmw", key, f"{_what(op)}, as {_what(twin)} did", (twin.index, op.index)))
        else:
            answered[value] = op
        before = [(o, v) for o, v in acknowledged if v is not None and o.complete < op.invoke and v >= value]
        if before:
            o, v = max(before, key=lambda pair: pair[1])
            found.append(Violation("rmw", key, f"{_what(op)} after {_what(o)}", (o.index, op.index)))
    reads = [op for op in ops if op.kind == "get" and op.outcome == OK]
    if state is not None:
        reads.append(Op(-1, _REPLICAS, "kvstores", "get", key, None, state.at, state.at, OK, state.value))
    for op in reads:
        final = op.client in (_FINAL, _REPLICAS)
        value = _number(op.result)
        if op.result is None:
            if created_at < op.invoke:
                category = "lost-write" if final else "stale-read"
                found.append(Violation(category, key, f"{_what(op)} after the counter was set", (op.index,)))
            continue
        if value is None:
            found.append(Violation("phantom", key, f"{_what(op)}, not a number", (op.index,)))
            continue
        before = [(o, v) for o, v in acknowledged if v is not None and o.complete < op.invoke and v > value]
        if before:
            o, v = max(before, key=lambda pair: pair[1])
            category = "lost-write" if final else "stale-read"
            found.append(Violation(category, key, f"{_what(op)} after {_what(o)}", (o.index, op.index)))
        if final:
            low, high = base + len(acknowledged), base + len(acknowledged) + maybe
            if not low <= value <= high and not before:
                what = "lost increments" if value < low else "more increments than were sent"
                found.append(
                    Violation(
                        "lost-write" if value < low else "phantom",
                        key,
                        f"{_what(op)}: {what} ({len(acknowledged)} acknowledged, {maybe} indeterminate"
                        f" or failed, from {base})",
                        (op.index,) if op.index >= 0 else (),
                    )
                )
    return found
