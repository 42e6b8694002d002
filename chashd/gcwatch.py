# -*- test-case-name: tests.unit.test_bulk -*-
"""How long the garbage collector stops the process: full collections, measured with ``gc.callbacks``.

A full (generation 2) collection visits every object the collector tracks, and stops every thread for it,
the reactor's included: a pause every client request of that moment waits for. ``GCWatch`` times each one
(``gc.callbacks`` is called at the start and the end of every collection) and keeps their number, their
total and the longest, for ``/stats`` and ``/metrics``: ``gc_full_collections_total``,
``gc_full_pause_seconds_total``, ``gc_full_pause_max_seconds``.

The daemons also freeze what start-up made out of the collector (``chashd.daemon.freeze_startup_objects``),
so that a full collection costs what was allocated since; these figures show what is left.
``gc_frozen_objects`` is counted again only after a full collection: ``gc.get_freeze_count()`` walks the
whole frozen list (~65,000 objects in a kvstore, 1-2 ms), and ``/health`` (which the gateways and
bench/handoff.py poll, several times a second) reads these figures: a py-spy profile of a sending kvstore
during bench/handoff.py found a quarter of its reactor thread in that count.
"""

from __future__ import annotations

import gc
import time
from typing import Any

__all__ = ["GCWatch"]


class GCWatch:
    """Times full garbage collections once ``install()``-ed (until ``uninstall()``)."""

    def __init__(self) -> None:
        self.collections = 0
        self.total = 0.0
        self.longest = 0.0
        self._started = 0.0
        self._frozen: int | None = None  # counted at the first stats() after a full collection

    def install(self) -> None:
        """Start timing (idempotent)."""
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        """Stop timing."""
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        self._frozen = None  # frozen objects may have been freed, or a freeze() may follow this collection
        self.collections += 1
        self.total += pause
        self.longest = max(self.longest, pause)

    def stats(self) -> dict[str, float]:
        """The figures, for ``/stats`` and ``/metrics`` (the frozen objects as counted after the last full
        collection, or at the first call)."""
        if self._frozen is None:
            self._frozen = gc.get_freeze_count()
        return {
            "gc_full_collections_total": self.collections,
            "gc_full_pause_seconds_total": round(self.total, 6),
            "gc_full_pause_max_seconds": round(self.longest, 6),
            "gc_frozen_objects": self._frozen,
        }
