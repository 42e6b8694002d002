"""The gateway's membership in the cluster map: the Twisted service over the Raft-replicated map.

Contracts:

- ``Membership`` builds its Raft object (``chashd.gateway.raft.ClusterRaft``, or a fake from
  ``chashd.gateway.testing``) in ``startService``, never before: pysyncobj's tick thread stops when the
  thread that built it ends, and twistd builds services before it runs the reactor.
- Every operation returns a Deferred that fires with the ``Outcome`` once the change is committed and this
  gateway's view has reached its epoch (read-your-writes on this gateway), or fails with
  ``ClusterMapUnavailable`` (no leader, a leader change, a timeout: safe to retry, as every operation is).
  While no leader is known, or this gateway has not heard from the one it knows within the election timeout
  (``map_current`` False), it fails at once and nothing is submitted. A command pending when this gateway
  learns it has no current leader fails then too, not after ``command_timeout``: its outcome is unknown (the
  leader may have committed it, or a later one may), and the error says it may or may not have been applied;
  one whose commit was already reported waits for its epoch and answers with its outcome.
  Nothing here blocks the reactor.
- ``view`` is the latest ``ClusterView``; observers (``subscribe``) get each new one, on the reactor thread,
  in epoch order. ``ready`` fires once the Raft state is loaded (journal replayed, leader known), and the
  gateway then registers itself in the map; ``joined`` fires once its view holds it (``in_map``), the moment
  ``GET /health`` turns 200 and systemd is told READY=1.
"""

from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from chashd.config import GatewayConfig, endpoint_port
from chashd.daemon import exit_with_status
from chashd.errors import ClusterMapUnavailable

# ClusterState and NodeInfo are imported for old Raft dumps only: before the cluster map had a module of its
# own, a dump pickled them under this module's name, and pysyncobj unpickles such a dump at start (then
# chashd.gateway.raft converts it to the plain form). GatewayInfo was pickled here too.
from chashd.gateway.clustermap import (
    ClusterSnapshot,
    ClusterState,  # noqa: F401
    ClusterView,
    GatewayInfo,
    Outcome,
)
from chashd.gateway.raft import (
    SUCCESS,
    ClusterRaft,
    RaftFactory,
    RaftHandle,
    RaftSettings,
    RaftStatus,
    ReactorBridge,
    describe_failure,
    raft_settings,
)
from chashd.node import NodeInfo  # noqa: F401

#: Why a change is refused while no leader is known.
NO_LEADER = (
    "no Raft leader is known: this gateway does not reach a majority of the gateways, or an election is under way"
)

#: Why a gateway that names a leader is not ready: it has not heard from it within the election timeout.
NOT_CURRENT = (
    "no Raft leader heard from within the election timeout: this gateway does not reach a majority of the "
    "gateways, so its cluster map may be stale"
)

__all__ = ["NOT_CURRENT", "NO_LEADER", "Membership", "MembershipReactor"]

#: The reactor Membership needs: ``IReactorTime`` (``seconds``, ``callLater``) and ``IReactorThreads``
#: (``callFromThread``). Typed loosely because test clocks provide these without declaring the interfaces.
MembershipReactor = Any


@dataclass
class _Pending:
    op: str
    deferred: Deferred[Outcome]
    timer: IDelayedCall | None
    outcome: Outcome | None = None


class Membership(Service):
    """The gateway's view of the cluster map and its way to change it, as the module docstring says.

    It is the ``RaftListener`` of its Raft object, behind a ``ReactorBridge``: the ``on_*`` methods run on
    the reactor thread.
    """

    _log = Logger()
    #: Longest wait, after a commit, for this gateway's view to reach the committed epoch.
    view_wait = 2.0
    #: Delay between attempts to register this gateway in the map.
    register_retry = 1.0
    #: How many recent views ``history`` keeps.
    history_size = 16

    def __init__(
        self,
        config: GatewayConfig,
        reactor: MembershipReactor,
        raft_factory: RaftFactory | None = None,
        on_view: Callable[[ClusterView], None] | None = None,
        command_timeout: float = 4.0,
        settings: RaftSettings | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.settings = settings or raft_settings(config)
        self._reactor = reactor
        self._factory: RaftFactory = raft_factory or ClusterRaft.create
        self._observers: list[Callable[[ClusterView], None]] = [on_view] if on_view else []
        self._contact_observers: list[Callable[[bool], None]] = []
        self.command_timeout = command_timeout
        self.view = ClusterView.empty(config.points_per_node)
        self._history: collections.deque[ClusterView] = collections.deque([self.view], maxlen=self.history_size)
        self.status = RaftStatus()
        #: Times the leader this gateway knows changed (None included), for /metrics.
        self.leader_changes = 0
        self.ready: Deferred[None] = Deferred()
        #: Fires once this gateway is in its view of the map (``in_map``).
        self.joined: Deferred[None] = Deferred()
        self._raft: RaftHandle | None = None
        self._tokens = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._registering = False
        self._register_call: IDelayedCall | None = None
        self._bind_check: IDelayedCall | None = None
        self._on_fatal = on_fatal or self._exit
        port = endpoint_port(config.port)
        host = config.advertise_host
        shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
        url = f"http://{shown}:{port}" if port is not None else ""
        self.self_info = GatewayInfo(config.gateway_id, self.settings.self_address, url)

    # -- lifecycle --------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.config.data_dir:
            os.makedirs(self.config.data_dir, exist_ok=True)
        else:
            self._log.warn("no --data-dir: the Raft journal is kept in memory only and lost on restart")
        self._log.info(
            "Raft: {address}, peers {peers}{secure}",
            address=self.settings.self_address,
            peers=", ".join(self.settings.peers) or "none",
            secure=" (encrypted)" if self.settings.password else "",
        )
        self._raft = self._factory(self.settings, ReactorBridge(self._reactor.callFromThread, self))
        self._bind_check = self._reactor.callLater(0.5, self._check_bound)
        self._maybe_register_self()  # in case a leader was reported while the factory ran

    def _check_bound(self) -> None:
        self._bind_check = None
        if self._raft is not None and self._raft.broken():
            message = f"cannot listen on the Raft address {self.settings.self_address} (in use?)"
            self._log.critical("{message}", message=message)
            self._on_fatal(message)

    def _exit(self, message: str) -> None:
        exit_with_status(self._reactor, 1)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        for call in (self._register_call, self._bind_check):
            if call is not None and call.active():
                call.cancel()
        self._register_call = self._bind_check = None
        for token in list(self._pending):
            self._fail(token, "the gateway is stopping")
        raft, self._raft = self._raft, None
        if raft is None:
            return None
        raft.destroy()
        if not raft.alive():
            return None
        done: Deferred[None] = Deferred()
        deadline = self._reactor.seconds() + 3.0

        def poll() -> None:
            if not raft.alive() or self._reactor.seconds() >= deadline:
                done.callback(None)
            else:
                self._reactor.callLater(0.05, poll)

        poll()
        return done

    # -- state ------------------------------------------------------------------------------------

    def subscribe(self, observer: Callable[[ClusterView], None]) -> None:
        """Call ``observer(view)`` with every new view (on the reactor thread)."""
        self._observers.append(observer)

    def unsubscribe(self, observer: Callable[[ClusterView], None]) -> None:
        """Stop calling ``observer``."""
        if observer in self._observers:
            self._observers.remove(observer)

    def subscribe_contact(self, observer: Callable[[bool], None]) -> None:
        """Call ``observer(map_current)`` each time ``map_current`` changes (on the reactor thread)."""
        self._contact_observers.append(observer)

    @property
    def map_current(self) -> bool:
        """True while this gateway's map is current: it leads, or heard from the leader within the election
        timeout (``RaftStatus.in_contact``). A gateway whose map may be stale runs no read-modify-write."""
        return self.status.in_contact

    @property
    def is_leader(self) -> bool:
        """True while this gateway is the Raft leader (as far as it knows)."""
        return self.status.is_leader

    @property
    def has_quorum(self) -> bool:
        """True while this gateway reaches a majority of the group."""
        return self.status.has_quorum

    @property
    def leader_known(self) -> bool:
        """True when a Raft leader is known."""
        return self.status.leader is not None

    @property
    def history(self) -> tuple[ClusterView, ...]:
        """The last ``history_size`` views this gateway published, oldest first (the current one last)."""
        return tuple(self._history)

    @property
    def in_map(self) -> bool:
        """True once this gateway is in its own view of the cluster map, as it registers itself (its id, Raft
        address and URL): the gateway a user reaches is one the group's map names."""
        return self.self_info in self.view.gateways

    def absence(self) -> str | None:
        """Why this gateway is not in its view of the cluster map yet (it registers itself once it hears
        from a Raft leader); None once it is."""
        if self.in_map:
            return None
        prefix = f"gateway {self.self_info.id} is not in the cluster map yet"
        if self._raft is None:
            return f"{prefix}: its Raft cluster map is not running"
        if not self.leader_known:
            return f"{prefix} (it registers itself once it hears from a Raft leader): {NO_LEADER}"
        if not self.map_current:
            return f"{prefix} (it registers itself once it hears from a Raft leader): {NOT_CURRENT}"
        return f"{prefix}: its registration is under way"

    def leader_id(self) -> str | None:
        """The leader gateway's id while this gateway's map is current (``map_current``: it leads, or heard
        from the leader within the election timeout), else None, as when no leader is known or the leader is
        not registered in the map yet. A follower cut off from the other gateways keeps naming its last
        leader (``last_leader_id``): that one is not a leader this gateway can count on."""
        return self.last_leader_id() if self.map_current else None

    def last_leader_id(self) -> str | None:
        """The id of the leader Raft names, also when this gateway has not heard from it within the election
        timeout (pysyncobj keeps the last leader's name until it holds an election); None when Raft names
        none or it is not registered in the map yet."""
        gateway = self.view.gateway_at(self.status.leader)
        return gateway.id if gateway is not None else None

    # -- operations -------------------------------------------------------------------------------

    def register_node(
        self, node_id: str, host: str, port: int, line_port: int, weight: int, seq: int
    ) -> Deferred[Outcome]:
        """Register or refresh a kvstore node."""
        return self._submit("register_node", node_id, host, port, line_port, weight, seq)

    def set_weight(self, node_id: str, weight: int) -> Deferred[Outcome]:
        """Change a node's weight."""
        return self._submit("set_weight", node_id, weight)

    def mark_down(self, node_id: str) -> Deferred[Outcome]:
        """Mark a node down."""
        return self._submit("mark_down", node_id)

    def mark_up(self, node_id: str) -> Deferred[Outcome]:
        """Mark a node up."""
        return self._submit("mark_up", node_id)

    def start_leaving(self, node_id: str) -> Deferred[Outcome]:
        """Start a node's drain."""
        return self._submit("start_leaving", node_id)

    def remove(self, node_id: str) -> Deferred[Outcome]:
        """Remove a node."""
        return self._submit("remove", node_id)

    def register_gateway(self, gateway_id: str, raft: str, url: str) -> Deferred[Outcome]:
        """Register a gateway."""
        return self._submit("register_gateway", gateway_id, raft, url)

    def _submit(self, op: str, *args: Any) -> Deferred[Outcome]:
        raft = self._raft
        if raft is None:
            return fail(ClusterMapUnavailable("the Raft cluster map is not running"))
        # Refused at once rather than after command_timeout: without a leader, or while this gateway has not
        # heard from the one Raft still names (a follower cut off from the others: pysyncobj would forward
        # the command over a link that is down and wait).
        if not self.leader_known:
            return fail(ClusterMapUnavailable(f"{op}: {NO_LEADER}", submitted=False))
        if not self.map_current:
            return fail(ClusterMapUnavailable(f"{op}: {NOT_CURRENT}", submitted=False))
        token = next(self._tokens)
        deferred: Deferred[Outcome] = Deferred(lambda _: self._cancel(token))
        timer = self._reactor.callLater(self.command_timeout, self._fail, token, "no answer in time")
        self._pending[token] = _Pending(op, deferred, timer)
        try:
            raft.submit(op, args, token)
        except Exception:
            self._forget(token)
            return fail()
        return deferred

    def _cancel(self, token: int) -> None:
        self._forget(token)

    def _forget(self, token: int) -> _Pending | None:
        pending = self._pending.pop(token, None)
        if pending is not None and pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        return pending

    def _fail(self, token: int, reason: str) -> None:
        pending = self._forget(token)
        if pending is None:
            return
        if pending.outcome is not None:
            # Committed, but this gateway's view lags: answer with what is known.
            pending.deferred.callback(pending.outcome)
            return
        pending.deferred.errback(ClusterMapUnavailable(f"{pending.op}: {reason}"))

    def _fail_unconfirmed(self, why: str) -> None:
        """Fail at once every pending command whose commit was not reported: this gateway has no current
        leader (``why``), so no answer is coming before ``command_timeout``. Whether it was applied is not
        known: the leader may have committed it before the contact was lost (or commit it later), pysyncobj
        may still hold it for the next leader. Commands whose commit was reported keep waiting for their
        epoch (``view_wait``) and answer with their outcome."""
        for token, pending in list(self._pending.items()):
            if pending.outcome is None:
                self._fail(token, f"contact with the Raft leader was lost before it confirmed the change: {why}")

    # -- RaftListener: the Raft object's reports, on the reactor thread (behind ReactorBridge) ------

    def on_command_done(self, token: int, outcome: Outcome | None, error: int) -> None:
        """A submitted operation finished: answer its Deferred (once the view reached its epoch)."""
        pending = self._pending.get(token)
        if pending is None:
            return  # timed out or cancelled
        if error != SUCCESS or outcome is None:
            self._fail(token, describe_failure(error))
            return
        if outcome.epoch <= self.view.epoch:
            self._forget(token)
            pending.deferred.callback(outcome)
            return
        # Wait (briefly) for the view of this epoch, so the caller reads its own write here.
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        pending.outcome = outcome
        pending.timer = self._reactor.callLater(self.view_wait, self._fail, token, "view lag")

    def on_snapshot(self, snapshot: ClusterSnapshot) -> None:
        """A new state of the map: publish its view (an older or repeated epoch is ignored)."""
        if snapshot.epoch < self.view.epoch or (snapshot.epoch == self.view.epoch and self.view.epoch != 0):
            return
        self.view = ClusterView.build(snapshot, self.config.points_per_node, self.view)
        self._history.append(self.view)
        self._log.info(
            "cluster map epoch {epoch}: {nodes} node(s) in the ring, {gateways} gateway(s)",
            epoch=snapshot.epoch,
            nodes=len(self.view.ring),
            gateways=len(snapshot.gateways),
        )
        for observer in list(self._observers):
            try:
                observer(self.view)
            except Exception:
                self._log.failure("observer of the cluster map failed on epoch {epoch}", epoch=snapshot.epoch)
        for token, pending in list(self._pending.items()):
            if pending.outcome is not None and pending.outcome.epoch <= self.view.epoch:
                self._forget(token)
                pending.deferred.callback(pending.outcome)
        if not self.joined.called and self.in_map:
            self._log.info(
                "gateway {id} is in the cluster map at epoch {epoch}", id=self.self_info.id, epoch=self.view.epoch
            )
            self.joined.callback(None)
        self._maybe_register_self()

    def on_status(self, status: RaftStatus) -> None:
        """A new leader, role or quorum."""
        previous, self.status = self.status, status
        if status.leader != previous.leader:
            self.leader_changes += 1
            self._log.info(
                "Raft leader: {leader}{me}",
                leader=status.leader or "none",
                me=" (this gateway)" if status.is_leader else "",
            )
        if status.in_contact != previous.in_contact:
            if status.in_contact:
                self._log.info("in contact with the Raft leader: read-modify-writes run again")
            else:
                self._log.warn(
                    "no Raft leader heard from within the election timeout: this gateway's cluster map may be "
                    "stale, read-modify-writes are refused until a leader is heard from"
                )
            for observer in list(self._contact_observers):
                try:
                    observer(status.in_contact)
                except Exception:
                    self._log.failure("observer of the Raft contact failed")
        if not status.in_contact:
            self._fail_unconfirmed(NO_LEADER if status.leader is None else NOT_CURRENT)
        self._maybe_register_self()

    def on_ready(self) -> None:
        """The Raft state is loaded: fire ``ready``."""
        if not self.ready.called:
            self._log.info("Raft state loaded at epoch {epoch}", epoch=self.view.epoch)
            self.ready.callback(None)

    def on_failure(self, failure: Failure, what: str) -> None:
        """Log what went wrong on the Raft thread."""
        self._log.failure("Raft thread failed {what}", failure, what=what)

    # -- this gateway in the map ------------------------------------------------------------------

    def _maybe_register_self(self) -> None:
        if not self.running or self._registering or self._raft is None or not self.map_current:
            return  # on_status calls again once a leader is heard from
        if self._register_call is not None and self._register_call.active():
            return
        if self.self_info in self.view.gateways:
            return
        self._registering = True
        info = self.self_info
        d = self.register_gateway(info.id, info.raft, info.url)
        d.addCallbacks(self._registered, self._register_failed)

    def _registered(self, outcome: Outcome) -> None:
        self._registering = False
        if outcome.changed:
            self._log.info("gateway {id} registered in the cluster map", id=self.self_info.id)
        self._maybe_register_self()

    def _register_failed(self, failure: Failure) -> None:
        self._registering = False
        if not self.running:
            return
        self._log.warn("cannot register this gateway yet: {error}", error=failure.getErrorMessage())
        self._register_call = self._reactor.callLater(self.register_retry, self._retry_register)

    def _retry_register(self) -> None:
        self._register_call = None
        self._maybe_register_self()
