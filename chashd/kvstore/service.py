# -*- test-case-name: tests.unit.test_drain,tests.unit.test_tap -*-
"""The kvstore node: its engine, its local backend, its thread pool, its registration with the gateways,
and its rebalancing (the ring watch, ``chashd.kvstore.ringwatch``, feeding the handoff,
``chashd.kvstore.handoff``). The drain that ends a node is ``chashd.kvstore.drain``'s."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import Any, cast

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from chashd.client import AsyncKVStoreClient
from chashd.config import KVStoreConfig, endpoint_port
from chashd.errors import ConfigError
from chashd.interfaces import IStorageEngine
from chashd.kvstore.antientropy import AntiEntropy
from chashd.kvstore.antientropy import Connect as PeerConnect
from chashd.kvstore.backend import LocalBackend
from chashd.kvstore.handoff import Connect, Handoff
from chashd.kvstore.placement import RingUpdate
from chashd.kvstore.registration import Registrar
from chashd.kvstore.ringwatch import RingWatch
from chashd.record import TOMBSTONE_GRACE

__all__ = ["CLUSTER_FIGURES", "KVStoreService", "open_engine"]

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
    # Checkpoints run in the service's thread pool (see KVStoreService), not in the writing thread.
    return SQLiteEngine(
        os.path.join(config.data_dir, DATABASE_NAME), autocheckpoint=0, disk_limit_bytes=config.disk_limit * MIB
    )


class KVStoreService(MultiService):
    """Owns what a kvstore node is: its engine and backend, a thread pool for work that may block (range
    scans, purges, checkpoints: ``run_in_pool(fn, *args)``; tests pass a synchronous runner), its
    registration with the gateways, and the handoff that the ring watch feeds.

    ``cluster`` is the client of the gateways (None: the node serves alone, with no registration and no
    ring); ``connect(host, line_port)`` makes a connection to a handoff target, ``connect_peer`` one to an
    anti-entropy peer (default: ``connect``). They come from ``chashd.kvstore.tap``, which makes every client
    of the role.

    Point reads and writes stay on the reactor thread: they cost microseconds, less than a hop to a
    thread and back (measured in bench/kvstore.py).
    """

    _log = Logger()
    purge_interval = 60.0
    checkpoint_interval = 1.0

    def __init__(
        self,
        config: KVStoreConfig,
        reactor: Any,
        engine: IStorageEngine,
        cluster: AsyncKVStoreClient | None,
        connect: Connect,
        run_in_thread: Callable[..., Deferred[Any]] | None = None,
        connect_peer: PeerConnect | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self._reactor: IReactorTime = reactor
        self._started = reactor.seconds()
        self.engine = engine
        self.backend = LocalBackend(
            self.engine, config.node_id, reactor, config.max_value_size, max_clock_skew=config.max_clock_skew
        )
        self._pool: ThreadPool | None = None
        if run_in_thread is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=2, name=f"kvstore-{config.node_id}")
            pool = self._pool
            run_in_thread = partial(deferToThreadPool, reactor, pool)
        self.run_in_pool = run_in_thread
        #: Records the periodic purge forgot (expired, tombstones past their grace): ``purged_total`` in stats.
        self.purged = 0
        TimerService(self.purge_interval, self._purge_in_pool).setServiceParent(self)
        if hasattr(self.engine, "checkpoint"):
            TimerService(
                self.checkpoint_interval, self._in_pool, "checkpoint", self.engine.checkpoint
            ).setServiceParent(self)
        # Rebalancing: the handoff moves data when the ring watch brings a new placement.
        database = getattr(self.engine, "path", None)
        state_path = os.path.join(os.path.dirname(database), HANDOFF_STATE_NAME) if database is not None else None
        self.handoff = Handoff(
            config.node_id, self.engine, self.run_in_pool, reactor, connect, state_path, rate=config.handoff_rate
        )
        self.handoff.setServiceParent(self)
        self.backend.stats_sources.append(self.handoff.stats)
        self.backend.on_epoch = self.handoff.newer_ring_seen
        self.backend.stats_sources.append(lambda: {"purged_total": self.purged})
        # Anti-entropy: compares the data with the other replicas' and repairs both, and answers them.
        if connect_peer is None:  # the KVClientPool a handoff connection is serves anti-entropy as well
            connect_peer = cast(PeerConnect, connect)
        self.anti_entropy = AntiEntropy(
            config.node_id,
            self.engine,
            self.handoff,
            self.backend.execute_puts,
            self.run_in_pool,
            reactor,
            connect_peer,
            interval=config.anti_entropy_interval,
            rate=config.anti_entropy_rate,
        )
        self.anti_entropy.setServiceParent(self)
        self.backend.ranges = self.anti_entropy
        self.backend.stats_sources.append(self.anti_entropy.stats)
        #: The client of the gateways' HTTP API (registration, the ring watch, the drain); None for a node
        #: given no gateway, which serves alone.
        self.cluster = cluster
        self.registrar: Registrar | None = None
        self.ring_watch: RingWatch | None = None
        if cluster is not None:
            self.registrar = Registrar(cluster, self.announcement, reactor, interval=config.register_interval)
            self.registrar.setServiceParent(self)
            self.ring_watch = RingWatch(cluster, reactor, self._ring_changed)
            self.ring_watch.setServiceParent(self)

    def _ring_changed(self, update: RingUpdate) -> None:
        """The ring watch's callback: the handoff first, then anti-entropy."""
        self.handoff.ring_changed(update)
        self.anti_entropy.ring_changed(update)

    # -- the thread pool ------------------------------------------------------------------------

    def _in_pool(self, what: str, fn: Any, *args: Any) -> Deferred[Any]:
        """A periodic job: run in the pool, log (never raise) a failure so the timer keeps running."""
        d = self.run_in_pool(fn, *args)
        d.addErrback(lambda f: self._log.failure("{what} failed", f, what=what))
        return d

    def _purge_in_pool(self) -> Deferred[Any]:
        return self._in_pool("purge", self._purge).addCallback(self._purged)

    def _purged(self, forgotten: int | None) -> None:
        self.purged += forgotten or 0

    def _purge(self) -> int:
        forgotten = self.engine.purge(self._reactor.seconds(), TOMBSTONE_GRACE)
        if forgotten:
            self._log.info("purged {count} expired records and old tombstones", count=forgotten)
        return forgotten

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
            self._pool.stop()  # waits for a job under way: purges and checkpoints are short
        self.engine.close()
        return stopped

    # -- what the node says about itself --------------------------------------------------------

    def announcement(self) -> dict[str, Any]:
        """What this node tells the gateways about itself."""
        return {
            "id": self.config.node_id,
            "host": self.config.advertise_host,
            "port": endpoint_port(self.config.port),
            "line_port": endpoint_port(self.config.line_port),
            "weight": self.config.weight,
            "seq": int(self._started * 1000),
        }

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
