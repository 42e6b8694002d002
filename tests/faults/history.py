"""The record of a fault-injection run: every client operation with its outcome, and the nemesis' faults.

An operation is *acknowledged* (``ok``: the server gave one of the protocol's answers, ``STORED``,
``NOT_STORED``, ``DELETED``, ``NOT_FOUND``, a number, a value or a miss), *failed* (``fail``: the server
answered with an error line, such as ``SERVER_ERROR`` when no quorum was reached, or the connection was
refused) or *indeterminate* (``info``: a timeout or a connection lost before the answer). Times are seconds
on the runner's monotonic clock since the run started.

Histories are written one JSON object a line (``history.jsonl``), so a run can be checked again offline
(``python -m tests.faults.runner --check DIR``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "FAIL",
    "INFO",
    "OK",
    "Event",
    "Op",
    "Recorder",
    "read_events",
    "read_history",
    "write_events",
    "write_history",
]

OK = "ok"
FAIL = "fail"
INFO = "info"

#: The operation kinds the workload issues.
KINDS = ("set", "add", "delete", "incr", "get")


@dataclass(frozen=True)
class Op:
    """One client operation.

    ``value`` is what a ``set``/``add`` wrote (unique in a run, so a read names the write it saw) or the
    delta of an ``incr``. ``result`` is the answer of an acknowledged operation: ``STORED``,
    ``NOT_STORED``, ``DELETED``, ``NOT_FOUND``, the number an ``incr`` answered, the value a ``get`` read
    (None for a miss). ``client`` is ``final`` for the reads after the run (the checker calls what they
    miss lost, not stale).
    """

    index: int
    client: str
    gateway: str
    kind: str
    key: str
    value: str | None
    invoke: float
    complete: float
    outcome: str
    result: str | None = None
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        """A plain dict for ``json.dumps``."""
        return asdict(self)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Op:
        """The inverse of ``to_json``."""
        return cls(**body)


@dataclass(frozen=True)
class Event:
    """One fault of the nemesis: what, on which daemon, from ``start`` until ``end`` (its heal done)."""

    fault: str
    target: str
    start: float
    end: float
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        """A plain dict for ``json.dumps``."""
        return asdict(self)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Event:
        """The inverse of ``to_json``."""
        return cls(**body)


class Recorder:
    """Collects the operations of every client thread, numbering them; times come from ``clock``
    relative to when the recorder was made."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._origin = clock()
        #: The wall-clock time of the run's 0 s (to find an operation in the daemons' logs).
        self.wall_origin = time.time()
        self._lock = threading.Lock()
        self._ops: list[Op] = []

    def now(self) -> float:
        """Seconds since the run started."""
        return float(self._clock() - self._origin)

    def record(
        self,
        client: str,
        gateway: str,
        kind: str,
        key: str,
        value: str | None,
        invoke: float,
        outcome: str,
        result: str | None = None,
        error: str = "",
    ) -> Op:
        """Add an operation that completed now (or was given up now)."""
        complete = self.now()
        with self._lock:
            op = Op(len(self._ops), client, gateway, kind, key, value, invoke, complete, outcome, result, error)
            self._ops.append(op)
        return op

    def ops(self) -> list[Op]:
        """Every operation recorded so far, in the order they completed."""
        with self._lock:
            return list(self._ops)


def _write_lines(path: Path, items: Iterable[Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item.to_json(), sort_keys=True))
            f.write("\n")


def _read_lines(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def write_history(path: Path, ops: Iterable[Op]) -> None:
    """Write ``ops`` to ``path``, one JSON object a line."""
    _write_lines(path, ops)


def read_history(path: Path) -> list[Op]:
    """The operations ``write_history`` wrote."""
    return [Op.from_json(body) for body in _read_lines(path)]


def write_events(path: Path, events: Iterable[Event]) -> None:
    """Write the nemesis' ``events`` to ``path``, one JSON object a line."""
    _write_lines(path, events)


def read_events(path: Path) -> list[Event]:
    """The events ``write_events`` wrote."""
    return [Event.from_json(body) for body in _read_lines(path)]
