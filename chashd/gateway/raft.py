"""The cluster map replicated with Raft: the pysyncobj adapter. This is the only module that imports pysyncobj.

Contracts:

- ``ClusterRaft`` is a ``SyncObj`` with one ``@replicated`` method per entry of
  ``chashd.gateway.clustermap.OPERATIONS``, named after the operation. pysyncobj runs them on its tick
  thread, on every gateway, also while it replays the journal at start. A journal entry records the
  method's number, which pysyncobj gives by sorting the methods by (``ver``, name), and the arguments: so an
  operation's name, arguments and ``ver`` never change, and a new operation takes a ``ver`` above every
  existing one (it is usable once pysyncobj's ``setCodeVersion`` enabled that version on the group, after
  every gateway runs code that knows it).
- The replicated state is the ``ClusterState`` of a ``SyncObjConsumer`` built before the ``SyncObj``, so it
  exists before the journal is replayed. A snapshot (the dump file, and what a leader sends a follower that
  lags) stores it as ``ClusterState.to_plain()``: tuples of ``str`` and ``int``, no class names. The
  ``SyncObj`` gets no attribute after ``super().__init__()`` (pysyncobj would snapshot it too).
- Nothing on the tick thread touches a Twisted object: the Raft object reports to a ``RaftListener``, and
  ``ReactorBridge`` hands each report to the reactor thread with ``callFromThread``. The reactor thread only
  calls ``submit`` (with pysyncobj's ``callback=``, never ``sync=True``: a sync call blocks on an event),
  ``destroy``, ``alive`` and ``broken``.
- Raft never runs without a password: without one, the Raft port unpickles whatever reaches it. A gateway
  without one stops before it binds (``chashd.config.check_secrets``), and ``ClusterRaft`` refuses to be built.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer, replicated
from pysyncobj.monotonic import monotonic
from twisted.python.failure import Failure

from chashd.config import GatewayConfig
from chashd.errors import ConfigError
from chashd.gateway.clustermap import (
    OPERATIONS,
    ClusterSnapshot,
    ClusterState,
    Operation,
    Outcome,
    apply_operation,
)

__all__ = [
    "SUCCESS",
    "ClusterRaft",
    "RaftFactory",
    "RaftHandle",
    "RaftListener",
    "RaftSettings",
    "RaftStatus",
    "ReactorBridge",
    "describe_failure",
    "raft_address",
    "raft_settings",
]

#: The ``error`` of a command that was applied.
SUCCESS: int = FAIL_REASON.SUCCESS

_FAIL_REASONS = {
    FAIL_REASON.QUEUE_FULL: "the command queue is full",
    FAIL_REASON.MISSING_LEADER: "no Raft leader is known (election in progress or no connection)",
    FAIL_REASON.DISCARDED: "a new leader discarded the command",
    FAIL_REASON.NOT_LEADER: "the gateway the command went to no longer leads",
    FAIL_REASON.LEADER_CHANGED: "the leader changed before it confirmed the command",
    FAIL_REASON.REQUEST_DENIED: "the command was denied",
    FAIL_REASON.UNKNOWN_OUTCOME: "the outcome is unknown",
}


def describe_failure(error: int) -> str:
    """A sentence for a command's ``error`` (pysyncobj's ``FAIL_REASON``)."""
    return _FAIL_REASONS.get(error, f"pysyncobj error {error}")


# -- settings ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RaftSettings:
    """How this gateway's ``SyncObj`` is built.

    A ``connection_timeout`` of 10 s (with pysyncobj's 3.5 s, a leader kill on a group that has run a while
    takes longer to elect), a short DNS cache (a restarted Kubernetes pod changes address), and one bind
    attempt, so a Raft port in use is reported instead of retried forever.

    ``leader_fallback_timeout``: a leader that heard from no majority of the group for that long steps down
    (pysyncobj's ``leaderFallbackTimeout``, 30 s by default, during which a leader cut off from the others
    kept saying it leads). 1.4 s is the longest election timeout (pysyncobj's ``raftMaxTimeout``): by the time
    the other side may elect a leader of its own, this one no longer claims to lead.
    """

    self_address: str
    peers: tuple[str, ...]
    password: str | None = None
    journal_file: str | None = None
    dump_file: str | None = None
    connection_timeout: float = 10.0
    connection_retry_time: float = 1.0
    dns_cache_time: float = 5.0
    dns_fail_cache_time: float = 1.0
    log_compaction_min_entries: int = 5000
    log_compaction_min_time: float = 300.0
    max_bind_retries: int = 1
    leader_fallback_timeout: float = 1.4


def _raft_host(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def raft_address(host: str, port: int) -> str:
    """The address pysyncobj uses for a gateway: ``host:port`` (an IPv6 address without brackets, since
    pysyncobj splits at the last colon). Every gateway must spell its peers the same way."""
    return f"{_raft_host(host)}:{port}"


def _normalize_peer(peer: str) -> str:
    host, _, port = peer.rpartition(":")
    return raft_address(host, int(port))


def raft_settings(config: GatewayConfig) -> RaftSettings:
    """The Raft settings of a gateway; raises ``ConfigError`` before anything binds.

    ``--peers`` entries equal to this gateway's own Raft address are dropped (listing every gateway on
    each of them is harmless). The password is required where a gateway starts (``check_secrets``) and by
    ``ClusterRaft`` itself: without one, the Raft port unpickles whatever reaches it.
    """
    self_address = raft_address(config.advertise_host, config.raft_port)
    peers = tuple(dict.fromkeys(p for p in map(_normalize_peer, config.peers) if p != self_address))
    if config.raft_password:
        try:
            import cryptography  # noqa: F401
        except ImportError:  # pragma: no cover - cryptography is a dependency of our dependencies
            raise ConfigError("option --raft-password: the Python package 'cryptography' is not installed") from None
    journal = dump = None
    if config.data_dir:
        journal = os.path.join(config.data_dir, "raft.journal")
        dump = os.path.join(config.data_dir, "raft.dump")
    return RaftSettings(self_address, peers, config.raft_password or None, journal, dump)


# -- what a Raft object reports, and to whom -----------------------------------------------------------


@dataclass(frozen=True)
class RaftStatus:
    """What this gateway knows of the Raft group: the leader's Raft address, its own role, quorum, and
    whether its map is current (``in_contact``): it leads (a leader that hears from no majority steps down
    within ``leader_fallback_timeout``), or a leader's heartbeat reached it within its election timeout.
    A follower cut off from every other gateway keeps naming the last leader it knew (pysyncobj starts no
    election without a connection), so ``leader`` alone does not say the map is current."""

    leader: str | None = None
    is_leader: bool = False
    has_quorum: bool = False
    in_contact: bool = False


class RaftListener(Protocol):
    """What a Raft object reports. ``ClusterRaft`` calls these on its tick thread; ``ReactorBridge`` moves
    each call to the reactor thread."""

    def on_snapshot(self, snapshot: ClusterSnapshot) -> None:
        """A new state of the map."""

    def on_status(self, status: RaftStatus) -> None:
        """A new leader, role or quorum."""

    def on_ready(self) -> None:
        """The state is loaded: the journal replayed and caught up with a known leader."""

    def on_command_done(self, token: int, outcome: Outcome | None, error: int) -> None:
        """A submitted command finished: ``error`` is ``SUCCESS`` or pysyncobj's ``FAIL_REASON``."""

    def on_failure(self, failure: Failure, what: str) -> None:
        """Something went wrong on the Raft thread."""


class RaftHandle(Protocol):
    """What ``Membership`` needs of a Raft object (``ClusterRaft``, or ``chashd.gateway.testing.LocalRaft``)."""

    def submit(self, op: str, args: tuple[Any, ...], token: int) -> None:
        """Submit operation ``op``; ``listener.on_command_done(token, ...)`` reports its end."""

    def destroy(self) -> None:
        """Stop (asynchronously)."""

    def alive(self) -> bool:
        """True while a thread of its own still runs."""

    def broken(self) -> bool:
        """True when it cannot work (its Raft port could not be bound)."""


#: Builds the Raft object of a gateway: ``ClusterRaft.create`` in production.
RaftFactory = Callable[[RaftSettings, RaftListener], RaftHandle]


class ReactorBridge:
    """A ``RaftListener`` for any thread: hands every report to ``listener`` through ``call_from_thread``
    (the reactor's ``callFromThread``), so ``listener`` runs on the reactor thread."""

    def __init__(self, call_from_thread: Callable[..., object], listener: RaftListener) -> None:
        self._call = call_from_thread
        self._listener = listener

    def on_snapshot(self, snapshot: ClusterSnapshot) -> None:
        self._call(self._listener.on_snapshot, snapshot)

    def on_status(self, status: RaftStatus) -> None:
        self._call(self._listener.on_status, status)

    def on_ready(self) -> None:
        self._call(self._listener.on_ready)

    def on_command_done(self, token: int, outcome: Outcome | None, error: int) -> None:
        self._call(self._listener.on_command_done, token, outcome, error)

    def on_failure(self, failure: Failure, what: str) -> None:
        self._call(self._listener.on_failure, failure, what)


# -- pysyncobj ----------------------------------------------------------------------------------------


class _MapHolder(SyncObjConsumer):  # type: ignore[misc]  # pysyncobj has no type hints: a subclass of Any
    """Holds the replicated ``ClusterState``. Built before the SyncObj, so the state exists before the tick
    thread replays the journal; a snapshot stores the state's plain form."""

    def __init__(self) -> None:
        super().__init__()
        self.state = ClusterState()

    def _serialize(self) -> dict[str, Any]:
        return {"map": self.state.to_plain()}

    def _deserialize(self, data: dict[str, Any]) -> None:
        if "map" in data:
            self.state = ClusterState.from_plain(data["map"])
        else:
            # A snapshot written before the map had a module of its own holds the ClusterState object itself,
            # pickled under chashd.gateway.membership (which still names its classes for that).
            self.state = ClusterState.from_plain(data["state"].to_plain())


def _replicated_operation(op: Operation) -> Callable[..., Outcome]:
    """The body of the replicated method of ``op``: apply it to the replicated state."""

    def apply(self: ClusterRaft, *args: Any) -> Outcome:
        return apply_operation(self._holder.state, op.name, args)

    apply.__name__ = op.name
    apply.__qualname__ = f"ClusterRaft.{op.name}"
    apply.__doc__ = f"Replicated ``ClusterState.{op.name}{op.params}``."
    return apply


class ClusterRaft(SyncObj):  # type: ignore[misc]  # pysyncobj has no type hints: a subclass of Any
    """The cluster map's ``SyncObj``: one ``@replicated`` method per operation of the map.

    Every attribute is set before ``super().__init__()`` so that none is snapshotted; the replicated
    state is ``_MapHolder.state``. ``submit()`` is the only entry point of the reactor thread; what
    happens on the tick thread reaches the reactor through the listener only.
    """

    # pysyncobj's @replicated must run in the class body: it adds a copy of each method, named
    # "<name>_v<ver>", to the namespace it is called from, and numbers the methods by those copies.
    for _op in OPERATIONS.values():
        vars()[_op.name] = replicated(ver=_op.ver)(_replicated_operation(_op))
    del _op

    def __init__(self, settings: RaftSettings, listener: RaftListener) -> None:
        if not settings.password:  # pysyncobj would unpickle whatever reaches the Raft port
            raise ConfigError("option --raft-password is required: Raft never runs without a password")
        self._holder = _MapHolder()
        self._listener = listener
        self._reported_epoch = -1
        self._reported_status: RaftStatus | None = None
        self._reported_ready = False
        self._destroyed = False
        conf = SyncObjConf(
            password=settings.password,
            journalFile=settings.journal_file,
            fullDumpFile=settings.dump_file,
            bindAddress=settings.self_address,
            connectionTimeout=settings.connection_timeout,
            connectionRetryTime=settings.connection_retry_time,
            dnsCacheTime=settings.dns_cache_time,
            dnsFailCacheTime=settings.dns_fail_cache_time,
            logCompactionMinEntries=settings.log_compaction_min_entries,
            logCompactionMinTime=settings.log_compaction_min_time,
            maxBindRetries=settings.max_bind_retries,
            leaderFallbackTimeout=settings.leader_fallback_timeout,
            useFork=False,
            appendEntriesUseBatch=True,
            commandsWaitLeader=True,
        )
        super().__init__(settings.self_address, list(settings.peers), conf, consumers=[self._holder])
        self.addOnTickCallback(self._after_tick)

    @classmethod
    def create(cls, settings: RaftSettings, listener: RaftListener) -> ClusterRaft:
        """The production ``RaftFactory``."""
        return cls(settings, listener)

    # -- reactor thread ---------------------------------------------------------------------------

    def submit(self, op: str, args: tuple[Any, ...], token: int) -> None:
        """Queue a command for the leader (forwarded there by pysyncobj when this gateway follows)."""
        if op not in OPERATIONS:
            raise ValueError(f"no operation {op!r}")
        listener = self._listener

        def done(result: Any, error: int) -> None:
            listener.on_command_done(token, result if isinstance(result, Outcome) else None, error)

        getattr(self, op)(*args, callback=done)

    def alive(self) -> bool:
        """True while the tick thread runs."""
        return bool(self.tick_thread_alive())

    def broken(self) -> bool:
        """True when the tick thread ended without ``destroy()``: the Raft port could not be bound."""
        return not self._destroyed and not self.tick_thread_alive()

    def destroy(self) -> None:
        """Stop the tick thread (it closes the connections and the journal on its way out)."""
        self._destroyed = True
        super().destroy()

    # -- tick thread --------------------------------------------------------------------------------

    def _heard_from_leader(self, leader: Any) -> bool:
        """True while this follower's election deadline is ahead: a heartbeat of ``leader`` came within the
        election timeout (pysyncobj moves the deadline at each ``append_entries`` from the leader). pysyncobj
        exposes no such time, so this reads its private deadline; a pysyncobj without it falls back to
        whether the connection to the leader is up (which a cut link keeps up to ``connectionTimeout``)."""
        deadline = getattr(self, "_SyncObj__raftElectionDeadline", None)
        if isinstance(deadline, (int, float)):
            return bool(monotonic() < deadline)
        return bool(self.isNodeConnected(leader))

    def _after_tick(self) -> None:
        """Report a new epoch, a new status and readiness (each only when it changed)."""
        try:
            state = self._holder.state
            if state.epoch != self._reported_epoch:
                self._reported_epoch = state.epoch
                self._listener.on_snapshot(state.snapshot())
            leader = self._getLeader()
            is_leader = bool(self._isLeader())
            status = RaftStatus(
                leader=getattr(leader, "address", None) if leader is not None else None,
                is_leader=is_leader,
                has_quorum=bool(self.hasQuorum),
                in_contact=is_leader or (leader is not None and self._heard_from_leader(leader)),
            )
            if status != self._reported_status:
                self._reported_status = status
                self._listener.on_status(status)
            if not self._reported_ready and self.isReady():
                self._reported_ready = True
                self._listener.on_ready()
        except Exception:
            self._listener.on_failure(Failure(), "reporting the Raft state")
