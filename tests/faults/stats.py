"""Figures of a fault-injection run: availability during each fault, latency of the acknowledged operations.

Pure: reads ``Op`` and ``Event`` records.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tests.faults.history import OK, Event, Op

__all__ = ["AFTER_HEAL", "Window", "availability", "percentile"]


@dataclass(frozen=True)
class Window:
    """The client operations invoked between ``start`` and ``end`` and how many of them did not succeed
    (failed or indeterminate)."""

    label: str
    start: float
    end: float
    ops: int
    failed: int

    @property
    def failed_share(self) -> float:
        """The share of operations that did not succeed (0 when there were none)."""
        return self.failed / self.ops if self.ops else 0.0

    def to_json(self) -> dict[str, Any]:
        """A plain dict for ``json.dumps``."""
        return {**asdict(self), "failed_share": round(self.failed_share, 4)}


def _window(label: str, start: float, end: float, ops: Sequence[Op]) -> Window:
    inside = [op for op in ops if start <= op.invoke < end]
    return Window(label, start, end, len(inside), sum(1 for op in inside if op.outcome != OK))


#: Seconds after a heal whose operations ``availability`` also counts on their own: a fault can cost more
#: than its window (a gateway cut from the others refuses read-modify-writes until it hears from the Raft
#: leader again, 1.5-4.6 s after the heal in bench/faults.py's runs).
AFTER_HEAL = 5.0


def availability(ops: Sequence[Op], events: Sequence[Event], after: float = AFTER_HEAL) -> list[Window]:
    """One window per fault (from its start to its heal), each followed by one labelled ``after ...``: the
    ``after`` seconds from its heal (up to the next fault's start); then ``no fault`` (the operations invoked
    outside every fault, those after a heal included) and ``all``. Only the clients' operations count (not
    the final reads)."""
    ops = [op for op in ops if op.client not in ("final", "setup")]
    windows: list[Window] = []
    for e in events:
        windows.append(_window(f"{e.fault} {e.target}", e.start, e.end, ops))
        if after > 0:
            following = [other.start for other in events if other.start >= e.end]
            end = min([e.end + after, *following])
            windows.append(_window(f"after {e.fault} {e.target}", e.end, end, ops))
    calm = [op for op in ops if not any(e.start <= op.invoke < e.end for e in events)]
    if ops:
        first, last = min(op.invoke for op in ops), max(op.invoke for op in ops)
        windows.append(Window("no fault", first, last, len(calm), sum(1 for op in calm if op.outcome != OK)))
        windows.append(_window("all", first, last + 1.0, ops))
    return windows


def percentile(values: Sequence[float], share: float) -> float | None:
    """The ``share`` (0-1) percentile of ``values`` (nearest rank), None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1))
    return ordered[rank]
