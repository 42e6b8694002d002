"""twistd wiring of the kvstore role: ``twistd -n chash-kvstore --node-id a --port 8080``."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, cast

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from chashd.client import AsyncKVStoreClient
from chashd.config import ConfigOptions, KVStoreConfig, check_secrets, connection_limits, options_for
from chashd.daemon import ListenService, SystemdNotifier, freeze_startup_objects, lock_data_dir, shutdown_command
from chashd.errors import ConfigError, StorageError
from chashd.gcwatch import GCWatch
from chashd.interfaces import IStorageEngine
from chashd.kvstore.antientropy import AntiEntropy
from chashd.kvstore.antientropy import Connect as PeerConnect
from chashd.kvstore.backend import LocalBackend
from chashd.kvstore.drain import KVStoreRoot
from chashd.kvstore.handoff import Connect, Handoff
from chashd.kvstore.placement import RingUpdate
from chashd.kvstore.registration import Registrar
from chashd.kvstore.ringwatch import RingWatch
from chashd.kvstore.service import Housekeeping, KVStoreService, announcement, handoff_state_path, open_engine
from chashd.logs import with_log_format
from chashd.memcache.client import KVClientPool
from chashd.memcache.server import MemcacheServerFactory
from chashd.metrics import ConnectionsCollector, RequestMetrics, daemon_registry
from chashd.tls import client_endpoint, https_policy, load_ca
from chashd.web import KeyValueHTTP

__all__ = ["Options", "makeService", "make_node"]

#: Seconds a request to a gateway may take (a long poll of the ring waits 25 s more on purpose).
CLUSTER_TIMEOUT = 10.0
#: Seconds a push of the handoff may wait for its answer: a page is acknowledged in milliseconds, and a target
#: that keeps one waiting this long (paused, cut off) is owed its arcs, pushed again after the others.
HANDOFF_TIMEOUT = 10.0
#: Seconds an anti-entropy request to a peer may wait for its answer.
ANTI_ENTROPY_TIMEOUT = 300.0


class Options(options_for(KVStoreConfig, "chash-kvstore")):  # type: ignore[misc]  # a class made at run time
    """``twistd chash-kvstore`` options; a node whose ports listen beyond loopback without the cluster token
    stops here with one line, before it binds anything."""

    def postOptions(self) -> None:
        super().postOptions()
        try:
            check_secrets(self.config)
            load_ca(self.config.tls_ca)
        except ConfigError as e:
            raise SystemExit(f"chash-kvstore: error: {e}") from None


def makeService(
    options: ConfigOptions, reactor: Any = None, run_in_thread: Callable[..., Deferred[Any]] | None = None
) -> IService:
    """Build the kvstore: the clients it talks to the cluster with (the gateways' HTTP API, the handoff's
    line-protocol connections), the node over them (``make_node``), its HTTP and line-protocol listeners, the
    readiness notice.

    The storage engine is opened here, before anything listens, so that a database that cannot be used
    stops the daemon with one line and a non-zero status. Tests pass a memory reactor and a synchronous
    ``run_in_thread``. The root stops its children only after the node's drain (``KVStoreRoot``); the
    daemon (the global reactor) also takes a second SIGTERM during a drain as the order to give up.
    Raises ``ConfigError`` for a missing token (``check_secrets``).
    """
    handle_signals = reactor is None
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
        freeze_startup_objects(reactor)  # the daemon's process: short full garbage collections
    config: KVStoreConfig = options.config
    check_secrets(config)
    try:
        if config.data_dir:
            lock_data_dir(config.data_dir)
        engine = open_engine(config)
    except (ConfigError, StorageError) as e:
        raise SystemExit(f"chash-kvstore: error: {e}") from None
    ca = load_ca(config.tls_ca)
    cluster = None
    if config.gateway:
        tls = https_policy(load_ca(config.tls_ca))  # https:// gateway URLs verified against --tls-ca
        cluster = AsyncKVStoreClient(reactor, config.gateway, timeout=CLUSTER_TIMEOUT, token=config.token, tls=tls)

    def pool(host: str, port: int, timeout: float, probe_bulk: bool = False) -> KVClientPool:
        """One pipelined line-protocol connection to another kvstore (TLS verified against --tls-ca when given),
        which proves the cluster token first (xauth)."""
        reply_room = config.max_value_size + 4096  # a value and its command line
        endpoint = client_endpoint(reactor, host, port, 5.0, ca)
        return KVClientPool(
            reactor,
            host,
            port,
            size=1,
            timeout=timeout,
            max_value_size=reply_room,
            token=config.token,
            probe_bulk=probe_bulk,
            endpoint=endpoint,
        )

    def connect(host: str, port: int) -> KVClientPool:
        """A connection to a handoff target, which asks whether the target reads bulk pages."""
        return pool(host, port, HANDOFF_TIMEOUT, probe_bulk=True)

    def connect_peer(host: str, port: int) -> KVClientPool:
        """A connection to an anti-entropy peer: a digest of a large range may take the peer a while (its
        scans are rate limited), hence the long timeout."""
        return pool(host, port, ANTI_ENTROPY_TIMEOUT)

    node = make_node(config, reactor, engine, cluster, connect, connect_peer=connect_peer, run_in_thread=run_in_thread)
    notifier = SystemdNotifier()
    root = KVStoreRoot(node, reactor, handle_signals=handle_signals, notify_stopping=notifier.stopping)
    requests = RequestMetrics() if config.latency_histograms else None
    limits = connection_limits(config)
    line = MemcacheServerFactory(
        node.backend,
        reactor,
        max_value_size=config.max_value_size,
        max_keys=config.max_keys,
        max_pending_bytes=config.max_pending_bytes,
        shutdown=shutdown_command(reactor, config.enable_shutdown),
        requests=requests,
        token=config.token,
        **limits,
    )
    node.backend.stats_sources.append(line.auth_stats)
    connections = ConnectionsCollector(line)
    metrics = daemon_registry("kvstore", config.node_id, requests, connections, data_dir=config.data_dir)
    http = KeyValueHTTP(
        node.backend,
        health=node.health,
        ready=node.ready,
        max_value_size=config.max_value_size,
        metrics=metrics,
        role="kvstore",
        write_token=config.token,
        requests=requests,
    )
    node.backend.stats_sources.append(http.auth_stats)
    gc_watch = GCWatch()  # full collections' pauses in /stats and /metrics
    node.backend.stats_sources.append(gc_watch.stats)
    if handle_signals:  # the daemon's process (a test's process keeps its collector as it is)
        gc_watch.install()
    site = http.site(reactor=reactor, **limits)
    connections.add(site, "http")
    for description, factory, what in ((config.port, site, "HTTP"), (config.line_port, line, "line protocol")):
        listener = ListenService(reactor, description, factory, what)
        listener.setServiceParent(root)
        notifier.wait_for(listener.listening)
    notifier.setServiceParent(root)
    return with_log_format(root, config.log_format)


def make_node(
    config: KVStoreConfig,
    reactor: Any,
    engine: IStorageEngine,
    cluster: AsyncKVStoreClient | None,
    connect: Connect,
    connect_peer: PeerConnect | None = None,
    run_in_thread: Callable[..., Deferred[Any]] | None = None,
) -> KVStoreService:
    """The kvstore node over ``engine``, its parts made with their timers and clients: the backend, the
    thread pool (``run_in_thread``, a synchronous runner in tests, replaces it), the periodic jobs run there,
    the handoff and anti-entropy, and, given the gateways' ``cluster`` client, the registration and the ring
    watch, which feeds each new ring to the handoff, then to anti-entropy.

    ``connect(host, line_port)`` makes a connection to a handoff target, ``connect_peer`` one to an
    anti-entropy peer (default: ``connect``).
    """
    pool = None
    if run_in_thread is None:
        pool = ThreadPool(minthreads=0, maxthreads=2, name=f"kvstore-{config.node_id}")
        run_in_thread = partial(deferToThreadPool, reactor, pool)
    started = reactor.seconds()
    backend = LocalBackend(
        engine, config.node_id, reactor, config.max_value_size, max_clock_skew=config.max_clock_skew, restarted=True
    )
    housekeeping = Housekeeping(engine, run_in_thread, reactor)
    handoff = Handoff(
        config.node_id, engine, run_in_thread, reactor, connect, handoff_state_path(engine), rate=config.handoff_rate
    )
    if connect_peer is None:  # the KVClientPool a handoff connection is serves anti-entropy as well
        connect_peer = cast(PeerConnect, connect)
    anti_entropy = AntiEntropy(
        config.node_id,
        engine,
        handoff,
        backend.execute_puts,
        run_in_thread,
        reactor,
        connect_peer,
        interval=config.anti_entropy_interval,
        rate=config.anti_entropy_rate,
    )
    registrar = ring_watch = None
    if cluster is not None:
        registrar = Registrar(
            cluster, partial(announcement, config, started), reactor, interval=config.register_interval
        )

        def ring_changed(update: RingUpdate) -> None:
            """The ring watch's callback: the backend's map epoch (its read-modify-write fence), the handoff,
            then anti-entropy."""
            backend.know_epoch(update.epoch)
            handoff.ring_changed(update)
            anti_entropy.ring_changed(update)

        ring_watch = RingWatch(cluster, reactor, ring_changed)
    return KVStoreService(
        config, backend, run_in_thread, housekeeping, handoff, anti_entropy, cluster, registrar, ring_watch, pool
    )
