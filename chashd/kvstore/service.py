# -*- test-case-name: tests.unit.test_drain,tests.unit.test_tap,tests.unit.test_kvstore_service -*-
"""The kvstore node: its engine, its local backend, its thread pool and the periodic jobs run there
(``Housekeeping``), its registration with the gateways, and its rebalancing (the ring watch,
``chashd.kvstore.ringwatch``, feeding the handoff, ``chashd.kvstore.handoff``, and anti-entropy,
``chashd.kvstore.antientropy``). ``chashd.kvstore.tap`` makes these parts; the drain that ends a node is
``chashd.kvstore.drain``'s."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from chashd.client import AsyncKVStoreClient
from chashd.config import KVStoreConfig, endpoint_port
from chashd.errors import ConfigError
from chashd.interfaces import IStorageEngine
from chashd.kvstore.antientropy import AntiEntropy
from chashd.kvstore.backend import LocalBackend
from chashd.kvstore.handoff import Handoff
from chashd.kvstore.registration import Registrar
from chashd.kvstore.ringwatch import RingWatch
from chashd.record import TOMBSTONE_GRACE

__all__ = ["CLUSTER_FIGURES", "Housekeeping", "KVStoreService", "announcement", "handoff_state_path", "open_engine"]

#: The figures a kvstore reports in ``GET /health`` for the gateways' cluster totals.
CLUSTER_FIGURES = ("curr_items", "bytes", "limit_maxbytes", "evictions", "total_items", "get_hits", "get_misses")

DATABASE_NAME = "kvstore.db"
MIB = 1024 * 1024
#: The ring the data conforms to, saved next to the database (``chashd.kvstore.placement.save_synced``).
HANDOFF_STATE_NAME = "handoff-ring.json"


def open_engine(config: KVStoreConfig) -> IStorageEngine:
    """The engine the config asks for: SQLite in ``--data-dir`` (the default with one), else memory.

    Raises ``ConfigError`` for ``--engine sqlite`` without a data dir and ``StorageError`` for a database
    that cannot be used; both before anything listens. ``--memory-limit``/``--memory-full`` bound the memory
    engine, ``--disk-limit`` the SQLite one.
    """
    from chashd.storage import MemoryEngine, SQLiteEngine

    if config.engine_kind == "memory":
        return MemoryEngine(limit_bytes=config.memory_limit * MIB, evict=config.memory_full == "evict")
    if not config.data_dir:
        raise ConfigError("option --engine: sqlite needs --data-dir (where the database file goes)")
    # Checkpoints run in the node's thread pool (see Housekeeping), not in the writing thread.
    return SQLiteEngine(
        os.path.join(config.data_dir, DATABASE_NAME), autocheckpoint=0, disk_limit_bytes=config.disk_limit * MIB
    )


def handoff_state_path(engine: IStorageEngine) -> str | None:
    """Where the handoff saves the ring the data conforms to: next to the database (None for an engine without
    a file, whose data does not outlive the process)."""
    database = getattr(engine, "path", None)
    return os.path.join(os.path.dirname(database), HANDOFF_STATE_NAME) if database is not None else None


def announcement(config: KVStoreConfig, started: float) -> dict[str, Any]:
    """What a node started at ``started`` (seconds) tells the gateways about itself (``Registrar``); the
    sequence number grows with each start of the node."""
    return {
        "id": config.node_id,
        "host": config.advertise_host,
        "port": endpoint_port(config.port),
        "line_port": endpoint_port(config.line_port),
        "weight": config.weight,
        "seq": int(started * 1000),
    }


class Housekeeping(MultiService):
    """The node's periodic jobs, run in its thread pool by ``run_in_pool``: the purge of expired records and
    of tombstones past their grace (every ``purge_interval`` seconds; ``purged`` counts what it forgot) and,
    for an engine that has one, the checkpoint (every ``checkpoint_interval``). A failed job is logged and
    runs again at its next turn."""

    _log = Logger()
    purge_interval = 60.0
    checkpoint_interval = 1.0

    def __init__(self, engine: IStorageEngine, run_in_pool: Callable[..., Deferred[Any]], clock: IReactorTime) -> None:
        super().__init__()
        self._engine = engine
        self._run_in_pool = run_in_pool
        self._clock = clock
        #: Records the periodic purge forgot (expired, tombstones past their grace): ``purged_total`` in stats.
        self.purged = 0
        timers = [TimerService(self.purge_interval, self._purge_in_pool)]
        if hasattr(engine, "checkpoint"):
            timers.append(TimerService(self.checkpoint_interval, self._in_pool, "checkpoint", engine.checkpoint))
        for timer in timers:
            timer.clock = clock
            timer.setServiceParent(self)

    def stats(self) -> dict[str, int]:
        """``purged_total``."""
        return {"purged_total": self.purged}

    def _in_pool(self, what: str, fn: Any, *args: Any) -> Deferred[Any]:
        """A periodic job: run in the pool, log (never raise) a failure so the timer keeps running."""
        d = self._run_in_pool(fn, *args)
        d.addErrback(lambda f: self._log.failure("{what} failed", f, what=what))
        return d

    def _purge_in_pool(self) -> Deferred[Any]:
        return self._in_pool("purge", self._purge).addCallback(self._purged)

    def _purged(self, forgotten: int | None) -> None:
        self.purged += forgotten or 0

    def _purge(self) -> int:
        forgotten = self._engine.purge(self._clock.seconds(), TOMBSTONE_GRACE)
        if forgotten:
            self._log.info("purged {count} expired records and old tombstones", count=forgotten)
        return forgotten


class KVStoreService(MultiService):
    """Owns what a kvstore node is: its backend over its engine, the thread pool for work that may block
    (range scans, purges, checkpoints: ``run_in_pool(fn, *args)``), the periodic jobs run there
    (``housekeeping``), its registration with the gateways (``registrar``), and its rebalancing: the handoff
    (``handoff``) and anti-entropy (``anti_entropy``), both fed by the ring watch (``ring_watch``).

    Its parts come made, with their timers and clients, from ``chashd.kvstore.tap``, the role's one wiring
    module; the node ties its backend to them (their figures in its stats, the newer epochs peers push for to
    the handoff, the ranges it answers digests of to anti-entropy), starts and stops the thread pool ``pool``
    around them (None: ``run_in_pool`` needs none, as a test's synchronous runner) and closes the engine
    last. ``cluster`` is the client of the gateways, None (with no registrar and no ring watch) for a node
    that serves alone.

    Point reads and writes stay on the reactor thread: they cost microseconds, less than a hop to a
    thread and back (measured in bench/kvstore.py).
    """

    _log = Logger()

    def __init__(
        self,
        config: KVStoreConfig,
        backend: LocalBackend,
        run_in_pool: Callable[..., Deferred[Any]],
        housekeeping: Housekeeping,
        handoff: Handoff,
        anti_entropy: AntiEntropy,
        cluster: AsyncKVStoreClient | None = None,
        registrar: Registrar | None = None,
        ring_watch: RingWatch | None = None,
        pool: ThreadPool | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.backend = backend
        self.engine = backend.engine
        self._pool = pool
        self.run_in_pool = run_in_pool
        self.housekeeping = housekeeping
        housekeeping.setServiceParent(self)
        self.handoff = handoff
        handoff.setServiceParent(self)
        backend.stats_sources.append(handoff.stats)
        backend.on_epoch = handoff.newer_ring_seen
        backend.stats_sources.append(housekeeping.stats)
        self.anti_entropy = anti_entropy
        anti_entropy.setServiceParent(self)
        backend.ranges = anti_entropy
        backend.stats_sources.append(anti_entropy.stats)
        #: The client of the gateways' HTTP API (registration, the ring watch, the drain); None for a node
        #: given no gateway, which serves alone.
        self.cluster = cluster
        self.registrar = registrar
        if registrar is not None:
            registrar.setServiceParent(self)
        self.ring_watch = ring_watch
        if ring_watch is not None:
            ring_watch.setServiceParent(self)

    def startService(self) -> None:
        if self._pool is not None:
            self._pool.start()
        super().startService()
        self._log.info(
            "kvstore {node_id} serving with the {engine} engine",
            node_id=self.config.node_id,
            engine=type(self.engine).__name__,
        )

    def stopService(self) -> Deferred[None]:
        stopped: Deferred[None] = super().stopService()
        self.backend.stop()
        if self._pool is not None:
            self._pool.stop()  # waits for a job under way: purges and checkpoints are short, a handoff's
            # drop ends after its transaction under way (the handoff, stopped above, no longer runs)
        self.engine.close()
        return stopped

    # -- what the node says about itself --------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """The body of ``GET /health``; ``handoff`` is the rebalancing progress the gateways read."""
        handoff = self.handoff.status()
        stats = self.backend.stats()
        handoff["records_received"] = stats["handoff_records_received_total"]
        return {
            "role": "kvstore",
            "id": self.config.node_id,
            "registered": self.registrar.registered_with is not None if self.registrar else None,
            "keys": self.engine.stats()["keys"],
            "handoff": handoff,
            # What a gateway sums into the cluster totals of its stats (chashd.gateway.service.GatewayAdmin).
            "stats": {name: stats.get(name, 0) for name in CLUSTER_FIGURES},
        }

    def ready(self) -> tuple[bool, str]:
        """``GET /ready``: serving, unless the node is leaving the ring."""
        if self.backend.leaving:
            return False, "the node is leaving the ring"
        return True, "serving"
