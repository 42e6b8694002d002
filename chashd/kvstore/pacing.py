"""How the handoff shares the reactor thread with the requests a kvstore serves.

The handoff's work on the reactor thread (serializing the records it pushes as ``xmove`` to a kvstore of
an earlier version; its SQLite work runs in the thread pool) is cut into units: each unit is a step of an
iterator (``next()`` does the work up to its next ``yield``). ``Pacer.run(units)`` runs them on a
``twisted.internet.task.Cooperator`` that runs one unit per iteration of the reactor, whatever the number
of iterators under way, so that between two units the reactor serves the I/O that came in: a client
request waits for one unit at most.

A unit's size follows a time budget: ``Sizer`` gives the number of records a unit takes so that it lasts
about ``budget`` seconds, from the time the last full units took, and ``sized_units`` cuts work on a
sequence of records into such units. The budget per reactor iteration is thus one unit of about ``budget``
seconds. The Cooperator ends each tick after one unit rather than after a time budget of its own: the units
are sized to the budget already, as large as it allows, since each one costs a fixed part too (a push's
write).

``Rate`` is the operator's throttle on the handoff (``--handoff-rate``: records or MiB a second, or both,
default unlimited), and ``RateBucket`` spaces the pages out to it: each page's turn comes once the pages
before it would have taken their time at that rate, so that the average never exceeds it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import CooperativeTask, Cooperator, TaskStopped
from twisted.python.failure import Failure

__all__ = ["Pacer", "Rate", "RateBucket", "Sizer", "Units", "sized_units"]

#: A unit of work is one step of such an iterator.
Units = Iterator[None]
_T = TypeVar("_T")


def _after_one_unit() -> Callable[[], bool]:
    """The Cooperator's termination predicate: every reactor iteration ends its tick after one unit."""
    return lambda: True


class Pacer:
    """Runs iterators of units of work, one unit per reactor iteration in all, taking turns.

    ``run(units)`` fires once ``units`` is exhausted, or fails with what a unit raised; ``stop_all()`` ends
    every iterator under way, whose ``run`` then fails with ``CancelledError``.
    """

    def __init__(self, clock: IReactorTime) -> None:
        def next_iteration(tick: Callable[[], None]) -> IDelayedCall:
            return clock.callLater(0, tick)

        self._cooperator = Cooperator(terminationPredicateFactory=_after_one_unit, scheduler=next_iteration)
        self._tasks: set[CooperativeTask[Units]] = set()

    def run(self, units: Units) -> Deferred[None]:
        """Run ``units``, a unit per turn, the first in the next iteration of the reactor."""
        task = self._cooperator.cooperate(units)
        self._tasks.add(task)
        done: Deferred[None] = Deferred()

        def finished(result: Units | Failure) -> None:
            self._tasks.discard(task)
            if not isinstance(result, Failure):
                done.callback(None)
            elif result.check(TaskStopped):
                done.errback(CancelledError())
            else:
                done.errback(result)

        task.whenDone().addBoth(finished)
        return done

    def stop_all(self) -> None:
        """End every iterator under way (their ``run`` fails with ``CancelledError``); none is left scheduled.

        Each task is stopped on its own: ``Cooperator.stop()`` removes the tasks from the list it walks, so
        it leaves every other task neither run nor ended (Twisted 26.10)."""
        for task in list(self._tasks):
            task.stop()


class Sizer:
    """How many records a unit of work takes so that it lasts about ``budget`` seconds: ``size`` starts at
    ``initial`` and moves halfway toward what the last unit's time per record allows, between ``minimum``
    (at most ``initial``) and ``maximum``. A unit measured as taking no time (a test's clock) doubles it.

    The time measured is the reactor's, which on a loaded machine includes the time the process waited for a
    CPU: the ``minimum`` keeps units from shrinking to a few records there, where each unit's fixed cost (a
    write, a transaction and its commit) would then be paid for every few records."""

    def __init__(self, initial: int, maximum: int, budget: float, minimum: int = 1) -> None:
        self.size = max(1, min(initial, maximum))
        self._minimum = max(1, min(minimum, self.size))
        self._maximum = maximum
        self._budget = budget

    def took(self, count: int, seconds: float) -> None:
        """A unit of ``count`` records took ``seconds``."""
        if count < self.size:  # a short tail says little
            return
        ideal = 2.0 * self.size if seconds <= 0 else self._budget * count / seconds
        self.size = max(self._minimum, min(self._maximum, round((self.size + ideal) / 2)))


def sized_units(items: Sequence[_T], sizer: Sizer, clock: IReactorTime, work: Callable[[Sequence[_T]], None]) -> Units:
    """The units of ``work`` on ``items``: each unit calls ``work`` on the next ``sizer.size`` items, and the
    time it took on ``clock`` sizes the next one. The unit of the last items ends the iterator."""
    done = 0
    while done < len(items):
        chunk = items[done : done + sizer.size]
        began = clock.seconds()
        work(chunk)
        sizer.took(len(chunk), clock.seconds() - began)
        done += len(chunk)
        if done < len(items):
            yield None


_RATE_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(records?|[kmg]i?b)?(?:/s)?", re.IGNORECASE)
_UNITS = {"kib": 1024, "kb": 1000, "mib": 1024**2, "mb": 1000**2, "gib": 1024**3, "gb": 1000**3}


@dataclass(frozen=True)
class Rate:
    """The most records and bytes (of values) a second the handoff sends, over every target; 0: no limit."""

    records: float = 0.0
    bytes: float = 0.0

    @property
    def unlimited(self) -> bool:
        """True when neither is limited."""
        return not self.records and not self.bytes

    @classmethod
    def parse(cls, raw: object) -> Rate:
        """``unlimited`` (or 0), ``<n>`` / ``<n> records/s`` (records a second), ``<n>MiB/s`` (also KiB,
        GiB, and the decimal kB, MB, GB), or both separated by a comma; raises ``ValueError``."""
        text = str(raw).strip()
        if text.lower() in ("", "0", "unlimited", "none"):
            return cls()
        records = size = 0.0
        for part in text.split(","):
            match = _RATE_PART.fullmatch(part.strip())
            if match is None:
                raise ValueError(f"{part.strip()!r} is not a rate: write records/s (5000) or bytes/s (20MiB/s)")
            number, unit = float(match.group(1)), (match.group(2) or "records").lower()
            if unit.startswith("record"):
                records = number
            else:
                size = number * _UNITS[unit]
        return cls(records, size)

    def __str__(self) -> str:
        if self.unlimited:
            return "unlimited"
        parts = []
        if self.records:
            parts.append(f"{self.records:g} records/s")
        if self.bytes:
            parts.append(f"{self.bytes / 1024**2:g} MiB/s")
        return ", ".join(parts)


class RateBucket:
    """Spaces work out to a ``Rate``: ``take`` says how long to wait before sending ``records`` records of
    ``size`` value bytes, counting the time the work before it takes at the rate."""

    def __init__(self) -> None:
        self._next = 0.0

    def take(self, rate: Rate, records: int, size: int, now: float) -> float:
        """Seconds to wait (0: now) before the work; books its time."""
        cost = max(records / rate.records if rate.records else 0.0, size / rate.bytes if rate.bytes else 0.0)
        start = max(now, self._next)
        self._next = start + cost
        return start - now
