"""Prometheus figures both roles export besides their backend's counters (``GET /metrics``).

    chashd_info{role, id, version}                      1: joins a daemon's other series to its node id
    chashd_request_duration_seconds{surface, command}   histogram of request latency, surface ``http`` or
                                                        ``line``, command family (see ``FAMILIES``)
    chashd_request_errors_total{surface, error}         requests answered with an error: ``client`` (bad
                                                        request: 4xx, CLIENT_ERROR, ERROR) or ``server``
                                                        (5xx, SERVER_ERROR)
    chashd_connections{surface}                         open line-protocol connections
    chashd_connections_accepted_total{surface}          line-protocol connections accepted
    chashd_memory_limit_bytes                           the memory the process may use: its cgroup's limit
                                                        (Kubernetes, systemd MemoryMax=), else the machine's
    chashd_data_dir_free_bytes, chashd_data_dir_size_bytes   the file system of --data-dir (kvstore with one)
    process_*                                           prometheus-client's ProcessCollector

Latency is recorded on the reactor thread only, so a histogram here is a list of bucket counts and a sum,
with no lock: prometheus-client's ``Histogram.observe`` takes a lock per observation and a Python loop
over the buckets, about 1 us, which alone would cost the kvstore's line protocol several percent of its
request rate (bench/kvstore.py --inprocess measures both). The counts are exported through
prometheus-client's ``HistogramMetricFamily`` at scrape time, in the standard exposition.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "BUCKETS",
    "FAMILIES",
    "ConnectionsCollector",
    "DiskCollector",
    "LatencyHistogram",
    "RequestMetrics",
    "daemon_registry",
    "memory_limit",
]

#: Upper bounds in seconds: 100 us (a kvstore's in-memory get) to 5 s (past the gateway's request timeout).
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

#: Command families: get (get, gets, gat, gats, HTTP GET/HEAD), store (set, add, replace, append, prepend,
#: cas, HTTP PUT), delete, arith (incr, decr), touch, internal (the versioned extension gateways and the
#: handoff send to kvstores), other (flush_all, stats, version, verbosity ...).
FAMILIES = ("get", "store", "delete", "arith", "touch", "internal", "other")
#: The families each surface has: HTTP's /kv reads, stores and deletes only.
SURFACES = {"http": ("get", "store", "delete"), "line": FAMILIES}


class LatencyHistogram:
    """Bucket counts (``counts[i]`` holds the observations at most ``BUCKETS[i]``, the last one the rest) and
    their sum. Not thread-safe: observe on one thread (the reactor's)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        """Count one request that took ``seconds``."""
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: ``(le, observations at most le)``, ending with ``+Inf``."""
        result = []
        running = 0
        for bound, count in zip(BUCKETS, self.counts):
            running += count
            result.append((repr(float(bound)), float(running)))
        result.append(("+Inf", float(running + self.counts[-1])))
        return result


class RequestMetrics(Collector):
    """Every (surface, command family) histogram of a daemon and its error counters, as one collector.

    ``histogram(surface, family)`` is the object an adapter keeps and observes into; ``error(surface,
    kind)`` counts an error answer. All series exist from the start, at zero.
    """

    def __init__(self, surfaces: Mapping[str, Iterable[str]] = SURFACES) -> None:
        self._histograms = {(s, f): LatencyHistogram() for s, families in surfaces.items() for f in families}
        self._errors = {(s, kind): 0 for s in surfaces for kind in ("client", "server")}

    def histogram(self, surface: str, family: str) -> LatencyHistogram:
        """The histogram of ``family`` on ``surface``; KeyError for a pair the surface does not have."""
        return self._histograms[(surface, family)]

    def error(self, surface: str, kind: str) -> None:
        """Count one error answer: ``kind`` is ``client`` or ``server``."""
        self._errors[(surface, kind)] += 1

    def errors(self, surface: str, kind: str) -> int:
        """The errors counted so far."""
        return self._errors[(surface, kind)]

    def collect(self) -> Iterator[Metric]:
        histograms = HistogramMetricFamily(
            "chashd_request_duration_seconds",
            "Time from a request's arrival to its answer, by surface and command family",
            labels=["surface", "command"],
        )
        for (surface, family), histogram in sorted(self._histograms.items()):
            histograms.add_metric([surface, family], histogram.cumulative(), histogram.total)
        yield histograms
        errors = CounterMetricFamily(
            "chashd_request_errors", "Requests answered with an error, by surface and kind", labels=["surface", "error"]
        )
        for (surface, kind), count in sorted(self._errors.items()):
            errors.add_metric([surface, kind], count)
        yield errors


#: The counters of a listener's limits (``chashd.memcache.server``, ``chashd.web._limits``): name, the
#: factory's attribute, what it counts.
_LIMIT_COUNTERS = (
    ("chashd_connections_refused", "rejected_connections", "Connections refused at --max-connections"),
    ("chashd_connections_evicted", "idle_evicted", "Idle connections closed to make room at --max-connections"),
    ("chashd_connections_slow_closed", "slow_closed", "Connections closed for taking --client-timeout on a request"),
)


class ConnectionsCollector(Collector):
    """Open and accepted connections of the listeners whose factories count them (``curr_connections``,
    ``total_connections``, as the line protocol's factory does for memcached's ``stats``), and the
    connections their limits refused or closed (``rejected_connections``, ``idle_evicted``, ``slow_closed``),
    each labelled with its surface. ``add(factory, surface)`` adds a listener (the HTTP site once it exists)."""

    def __init__(self, factory: Any, surface: str = "line") -> None:
        self._listeners: list[tuple[Any, str]] = [(factory, surface)]

    def add(self, factory: Any, surface: str) -> None:
        """Count ``factory``'s connections too, under ``surface``."""
        self._listeners.append((factory, surface))

    def collect(self) -> Iterator[Metric]:
        families = [
            (GaugeMetricFamily, "chashd_connections", "curr_connections", "Open client connections"),
            (CounterMetricFamily, "chashd_connections_accepted", "total_connections", "Client connections accepted"),
            *((CounterMetricFamily, name, attribute, what) for name, attribute, what in _LIMIT_COUNTERS),
        ]
        for kind, name, attribute, what in families:
            family = kind(name, what, labels=["surface"])
            for factory, surface in self._listeners:
                family.add_metric([surface], getattr(factory, attribute, 0))
            yield family


def memory_limit(proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> int | None:
    """The smallest cgroup v2 ``memory.max`` from this process's cgroup up to the root (a container's or a
    systemd unit's limit), else the machine's memory; None if neither can be read."""
    limits = []
    try:
        with open(os.path.join(proc, "self", "cgroup"), encoding="ascii") as f:
            path = next((line.strip()[3:] for line in f if line.startswith("0::")), None)
    except OSError:
        path = None
    while path is not None:
        try:
            with open(os.path.join(cgroup_root, path.lstrip("/"), "memory.max"), encoding="ascii") as f:
                value = f.read().strip()
            if value.isdigit():
                limits.append(int(value))
        except OSError:
            pass
        if path in ("/", ""):
            break
        path = os.path.dirname(path.rstrip("/")) or "/"
    try:
        with open(os.path.join(proc, "meminfo"), encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    limits.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    return min(limits) if limits else None


class _Gauges(Collector):
    """Gauges computed at scrape time: ``name -> (help, function)``; a function returning None is left out."""

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float | None]]]) -> None:
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        for name, (documentation, read) in self._gauges.items():
            value = read()
            if value is not None:
                yield GaugeMetricFamily(name, documentation, value=value)


class DiskCollector(_Gauges):
    """Free and total bytes of the file system holding ``path`` (the kvstore's data directory)."""

    def __init__(self, path: str) -> None:
        def stat() -> os.statvfs_result | None:
            try:
                return os.statvfs(path)
            except OSError:
                return None

        def free() -> float | None:
            s = stat()
            return None if s is None else float(s.f_bavail * s.f_frsize)

        def size() -> float | None:
            s = stat()
            return None if s is None else float(s.f_blocks * s.f_frsize)

        super().__init__(
            {
                "chashd_data_dir_free_bytes": ("Bytes free for this daemon on the data directory's file system", free),
                "chashd_data_dir_size_bytes": ("Size of the data directory's file system in bytes", size),
            }
        )


class _Info(Collector):
    def __init__(self, role: str, node_id: str) -> None:
        from chashd import __version__

        self._labels = [role, node_id, __version__]

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("chashd_info", "The daemon's role, id and version", labels=["role", "id", "version"])
        info.add_metric(self._labels, 1)
        yield info


def daemon_registry(
    role: str, node_id: str, *collectors: Collector | None, data_dir: str | None = None
) -> CollectorRegistry:
    """A registry with the figures every daemon exports (info, process, memory limit, the data directory's
    disk when there is one) and ``collectors`` (None ones left out)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_Info(role, node_id))
    ProcessCollector(registry=registry)
    limit = memory_limit()
    what = "Memory this process may use: its cgroup's limit, else the machine's"
    registry.register(_Gauges({"chashd_memory_limit_bytes": (what, lambda: limit)}))
    if data_dir:
        registry.register(DiskCollector(data_dir))
    for collector in collectors:
        if collector is not None:
            registry.register(collector)
    return registry
