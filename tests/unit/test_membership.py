"""The Membership service (chashd.gateway.membership) over an in-memory Raft (LocalRaft), on a memory
reactor: operations as Deferreds, views, readiness, self-registration, timeouts and leader changes."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from chashd.config import GatewayConfig, load_config
from chashd.errors import ClusterMapUnavailable
from chashd.gateway.clustermap import ClusterSnapshot, ClusterView, GatewayInfo, Outcome, OutcomeCode
from chashd.gateway.membership import NO_LEADER, NOT_CURRENT, Membership
from chashd.gateway.raft import RaftListener, RaftSettings, RaftStatus
from chashd.gateway.testing import LocalRaft


class ThreadlessReactor(MemoryReactorClock):
    """A memory reactor whose ``callFromThread`` runs the call on the next ``advance(0)``, as the real
    reactor runs it on its next iteration."""

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        self.callLater(0, f, *args, **kw)


def gateway_config(**values: Any) -> GatewayConfig:
    """A gateway config from option values, without the machine's environment."""
    return load_config(GatewayConfig, {"gateway_id": "g1", **values}, environ={})


class _Recorder:
    """A LocalRaft factory that keeps the last Raft object built."""

    def __init__(self, **kw: Any) -> None:
        self.kw = kw
        self.raft: LocalRaft | None = None
        self.calls = 0

    def __call__(self, settings: RaftSettings, listener: RaftListener) -> LocalRaft:
        self.calls += 1
        self.raft = LocalRaft(settings, listener, **self.kw)
        return self.raft


class MembershipTests(SynchronousTestCase):
    """Membership over LocalRaft, on a memory reactor."""

    def setUp(self) -> None:
        self.reactor = ThreadlessReactor()
        self.factory = _Recorder()
        self.views: list[ClusterView] = []
        self.config = gateway_config(raft_port="8001", port="tcp:8000")
        self.membership = Membership(self.config, self.reactor, self.factory, on_view=self.views.append)

    def start(self) -> LocalRaft:
        """Start the service and let the reactor run what the Raft side handed it."""
        self.membership.startService()
        self.reactor.advance(0)
        assert self.factory.raft is not None
        return self.factory.raft

    def command_timers(self) -> list[Any]:
        """The pending timers of submitted commands."""
        return [c for c in self.reactor.getDelayedCalls() if getattr(c, "func", None) == self.membership._fail]

    def stop(self) -> None:
        """Stop, and check no timer is left behind."""
        self.membership.stopService()
        self.reactor.advance(0)
        assert self.reactor.getDelayedCalls() == []

    def test_raft_built_in_start_service(self) -> None:
        """Nothing is built before startService (twistd builds services before the reactor runs)."""
        assert self.factory.calls == 0
        self.start()
        assert self.factory.calls == 1
        self.stop()
        assert self.factory.raft is not None and self.factory.raft.destroyed

    def test_ready_and_self_registration(self) -> None:
        """Once a leader is known, ready fires and the gateway registers itself; leader_id then names it."""
        self.start()
        self.assertIsNone(self.successResultOf(self.membership.ready))
        self.reactor.advance(0)
        assert self.membership.view.gateways == (GatewayInfo("g1", "127.0.0.1:8001", "http://127.0.0.1:8000"),)
        assert self.membership.leader_id() == "g1"
        assert self.membership.is_leader and self.membership.has_quorum and self.membership.leader_known
        self.stop()

    def test_joined_once_in_the_map(self) -> None:
        """``joined`` fires, and ``in_map``/``absence`` say so, once this gateway's own view holds it: not when
        the Raft state is loaded (``ready``) while its registration is still waiting in Raft."""
        self.factory.kw = {"leader": False}
        raft = self.start()
        assert not self.membership.in_map and "): no Raft leader is known" in (self.membership.absence() or "")
        raft.hold()
        raft.elect("127.0.0.1:8002")
        self.reactor.advance(0)
        self.successResultOf(self.membership.ready)
        self.assertNoResult(self.membership.joined)
        assert self.membership.absence() == "gateway g1 is not in the cluster map yet: its registration is under way"
        raft.release()
        self.reactor.advance(0)
        self.successResultOf(self.membership.joined)
        assert self.membership.in_map and self.membership.absence() is None
        self.stop()

    def test_no_leader_no_ready(self) -> None:
        """Without a leader, ready waits and nothing registers; a later leader makes both happen."""
        self.factory.kw = {"leader": False}
        raft = self.start()
        self.assertNoResult(self.membership.ready)
        assert raft.submitted == [] and self.membership.leader_id() is None
        raft.elect("127.0.0.1:8002")
        self.reactor.advance(0)
        self.successResultOf(self.membership.ready)
        assert raft.submitted == [("register_gateway", ("g1", "127.0.0.1:8001", "http://127.0.0.1:8000"))]
        assert not self.membership.is_leader
        assert self.membership.leader_id() is None  # the leader itself has not registered yet
        self.stop()

    def test_cut_off_follower_refuses_changes_at_once(self) -> None:
        """A gateway that Raft still tells the leader of but that has not heard from it within the election
        timeout (a follower cut off from the other gateways) refuses every change at once, before the command
        timeout and without submitting it, saying why; once it hears from a leader, changes run again."""
        raft = self.start()
        self.reactor.advance(0)
        raft.lose_contact()
        self.reactor.advance(0)
        before = list(raft.submitted)
        for d in (
            self.membership.start_leaving("a"),
            self.membership.remove("a"),
            self.membership.register_node("a", "h", 1, 2, 100, 1),
        ):
            error = self.failureResultOf(d, ClusterMapUnavailable).value
            assert isinstance(error, ClusterMapUnavailable) and not error.submitted
            assert "no Raft leader heard from within the election timeout" in str(error)
            assert "nothing was applied" in str(error)
        assert raft.submitted == before and self.command_timers() == []
        raft.elect("127.0.0.1:8002")
        self.reactor.advance(0)
        d = self.membership.register_node("a", "h", 1, 2, 100, 1)
        self.reactor.advance(0)
        assert self.successResultOf(d).code == OutcomeCode.REGISTERED
        self.stop()

    def test_self_registration_waits_for_leader_contact(self) -> None:
        """A gateway not in the map yet that names a leader it has not heard from does not try to register
        itself (it would be refused), and registers once it hears from one."""
        self.factory.kw = {"leader": False}
        raft = self.start()
        raft.listener.on_status(RaftStatus("127.0.0.1:8002", False, True, False))
        self.reactor.advance(0)
        assert self.membership.leader_known and not self.membership.map_current
        assert raft.submitted == []
        raft.elect("127.0.0.1:8002")
        self.reactor.advance(0)
        assert raft.submitted == [("register_gateway", ("g1", "127.0.0.1:8001", "http://127.0.0.1:8000"))]
        self.stop()

    def test_operation_fires_with_outcome_after_view(self) -> None:
        """An operation's Deferred fires after this gateway's view reached the outcome's epoch."""
        self.start()
        self.reactor.advance(0)
        d = self.membership.register_node("a", "h", 1, 2, 100, 1)
        self.assertNoResult(d)  # the reports wait for the reactor's next turn
        self.reactor.advance(0)
        outcome = self.successResultOf(d)
        assert outcome.code == OutcomeCode.REGISTERED
        assert self.membership.view.epoch == outcome.epoch
        assert self.membership.view.node("a") is not None
        assert self.views[-1] is self.membership.view
        self.stop()

    def test_history(self) -> None:
        """The service keeps the recent views, oldest first, bounded."""

        class Small(Membership):
            history_size = 3

        self.membership = Small(self.config, self.reactor, self.factory)
        self.start()
        self.reactor.advance(0)
        for i in range(4):
            self.membership.register_node(f"n{i}", "h", 1 + i, 2, 100, 1)
            self.reactor.advance(0)
        history = self.membership.history
        assert [v.epoch for v in history] == [3, 4, 5]
        assert history[-1] is self.membership.view
        assert history[-1].previous_ring is history[-2].ring
        self.stop()

    def test_idempotent_registration_keeps_epoch(self) -> None:
        """Registering twice: 'unchanged', same epoch, no new view."""
        self.start()
        self.reactor.advance(0)
        d1 = self.membership.register_node("a", "h", 1, 2, 100, 1)
        self.reactor.advance(0)
        first = self.successResultOf(d1)
        count = len(self.views)
        d2 = self.membership.register_node("a", "h", 1, 2, 100, 1)
        self.reactor.advance(0)
        assert self.successResultOf(d2) == Outcome(OutcomeCode.UNCHANGED, first.epoch)
        assert len(self.views) == count
        self.stop()

    def test_timeout_fails_with_domain_error(self) -> None:
        """No answer within command_timeout: ClusterMapUnavailable (safe to retry); a late answer is ignored."""
        raft = self.start()
        self.reactor.advance(0)
        raft.hold()
        d = self.membership.mark_down("a")
        self.reactor.advance(self.membership.command_timeout)
        failure = self.failureResultOf(d, ClusterMapUnavailable)
        assert "no answer in time" in str(failure.value) and "safe to retry" in str(failure.value)
        raft.release()
        self.reactor.advance(0)  # the late report finds nothing pending
        self.stop()

    def test_leader_changed_fails_with_domain_error(self) -> None:
        """A pysyncobj LEADER_CHANGED fails the Deferred with a clear reason."""
        raft = self.start()
        self.reactor.advance(0)
        raft.hold()
        d = self.membership.remove("a")
        raft.fail_held(5)
        self.reactor.advance(0)
        failure = self.failureResultOf(d, ClusterMapUnavailable)
        assert "leader changed" in str(failure.value)
        assert self.command_timers() == []
        self.stop()

    def test_pending_command_fails_when_leader_contact_is_lost(self) -> None:
        """A command waiting on Raft when this gateway stops hearing from the leader (a follower cut off from
        the others) fails at once, not after command_timeout, saying its outcome is unknown: it may or may
        not have been applied. No timer is left; the late report of the command finds nothing pending."""
        raft = self.start()
        self.reactor.advance(0)
        raft.hold()
        d = self.membership.mark_down("a")
        self.reactor.advance(self.membership.command_timeout / 4)
        self.assertNoResult(d)
        raft.lose_contact()
        self.reactor.advance(0)
        failure = self.failureResultOf(d, ClusterMapUnavailable)
        message = str(failure.value)
        assert failure.value.submitted, message
        assert "mark_down: contact with the Raft leader was lost before it confirmed the change" in message
        assert NOT_CURRENT in message and "it may or may not have been applied" in message, message
        assert self.command_timers() == []
        raft.release()  # applied after all: the gateway said it might be
        self.reactor.advance(0)
        self.stop()

    def test_pending_command_fails_when_no_leader_is_left(self) -> None:
        """The same when the leader is gone (an election under way, or this leader stepped down)."""
        raft = self.start()
        self.reactor.advance(0)
        raft.hold()
        d = self.membership.remove("a")
        raft.elect(None)
        self.reactor.advance(0)
        failure = self.failureResultOf(d, ClusterMapUnavailable)
        assert NO_LEADER in str(failure.value) and "may or may not have been applied" in str(failure.value)
        assert self.command_timers() == []
        self.stop()

    def test_committed_command_is_not_failed_when_leader_contact_is_lost(self) -> None:
        """A command whose commit was reported, waiting only for this gateway's view of its epoch, is not
        failed when the contact is lost: it answers with its outcome (here after view_wait, as the view of
        its epoch never comes)."""
        raft = self.start()
        self.reactor.advance(0)
        raft.listener = _DropSnapshots(raft.listener)
        d = self.membership.register_node("a", "h", 1, 2, 100, 1)
        self.reactor.advance(0)
        self.assertNoResult(d)
        raft.lose_contact()
        self.reactor.advance(0)
        self.assertNoResult(d)
        self.reactor.advance(self.membership.view_wait)
        assert self.successResultOf(d).code == OutcomeCode.REGISTERED
        self.stop()

    def test_not_started(self) -> None:
        """Before start (or after stop) an operation fails at once."""
        self.failureResultOf(self.membership.mark_up("a"), ClusterMapUnavailable)

    def test_stop_fails_pending_operations(self) -> None:
        """stopService fails what is pending and leaves no timer."""
        raft = self.start()
        self.reactor.advance(0)
        raft.hold()
        d = self.membership.start_leaving("a")
        self.stop()
        self.failureResultOf(d, ClusterMapUnavailable)

    def test_cancel(self) -> None:
        """Cancelling an operation forgets it and its timer."""
        raft = self.start()
        self.reactor.advance(0)
        raft.hold()
        d = self.membership.mark_down("a")
        assert len(self.command_timers()) == 1
        d.cancel()
        self.failureResultOf(d, CancelledError)
        assert self.command_timers() == []
        self.stop()

    def test_view_lag_is_bounded(self) -> None:
        """If the committed epoch's view never arrives, the operation still answers after view_wait."""
        raft = self.start()
        self.reactor.advance(0)
        listener = raft.listener
        raft.listener = _DropSnapshots(listener)
        d = self.membership.register_node("a", "h", 1, 2, 100, 1)
        self.reactor.advance(0)
        self.assertNoResult(d)
        self.reactor.advance(self.membership.view_wait)
        assert self.successResultOf(d).code == OutcomeCode.REGISTERED
        self.stop()

    def test_observer_failure_is_logged(self) -> None:
        """An observer that raises is logged and does not stop the others."""

        def broken(view: ClusterView) -> None:
            raise ValueError("boom")

        seen: list[int] = []
        self.membership.subscribe(broken)
        self.membership.subscribe(lambda v: seen.append(v.epoch))
        with capturedLogs() as events:
            self.start()
            self.reactor.advance(0)
        assert seen and seen[-1] == self.membership.view.epoch == 1
        failures = [e for e in events if e.get("log_failure") is not None]
        assert [e["epoch"] for e in failures] == [0, 1]
        assert all(e["log_failure"].check(ValueError) for e in failures)
        assert len(self.flushLoggedErrors(ValueError)) == 2
        self.membership.unsubscribe(broken)
        self.stop()

    def test_registration_retried(self) -> None:
        """A failed self-registration is retried after register_retry."""
        self.factory.kw = {"leader": False}
        raft = self.start()
        raft.hold()
        raft.elect(raft.settings.self_address)
        self.reactor.advance(0)
        assert raft.submitted[-1][0] == "register_gateway"
        raft.fail_held(2)
        self.reactor.advance(0)
        assert len(raft.submitted) == 1
        self.reactor.advance(self.membership.register_retry)
        assert len(raft.submitted) == 2
        raft.release()
        self.reactor.advance(0)
        assert self.membership.leader_id() == "g1"
        self.stop()

    def test_bind_failure_is_fatal(self) -> None:
        """A Raft object that reports itself broken (port in use) stops the daemon."""
        fatal: list[str] = []
        raft_box: list[LocalRaft] = []

        def factory(settings: RaftSettings, listener: RaftListener) -> LocalRaft:
            raft = LocalRaft(settings, listener)
            raft.broken = lambda: True  # type: ignore[method-assign]
            raft_box.append(raft)
            return raft

        membership = Membership(self.config, self.reactor, factory, on_fatal=fatal.append)
        membership.startService()
        self.reactor.advance(0.5)
        assert fatal and "127.0.0.1:8001" in fatal[0]
        membership.stopService()

    def test_status_tracks_raft(self) -> None:
        """Leader changes reported by Raft are visible at once."""
        raft = self.start()
        self.reactor.advance(0)
        raft.elect(None)
        self.reactor.advance(0)
        assert self.membership.status == RaftStatus(None, False, False)
        assert not self.membership.leader_known and self.membership.leader_id() is None
        self.stop()

    def test_contact_observers(self) -> None:
        """``map_current`` follows the Raft status's contact with a leader; the contact observers hear of each
        change (once), and a gateway that still names a leader it no longer hears from is not current."""
        raft = self.start()
        self.reactor.advance(0)
        heard: list[bool] = []
        self.membership.subscribe_contact(heard.append)
        assert self.membership.map_current
        raft.lose_contact()
        self.reactor.advance(0)
        assert not self.membership.map_current and self.membership.leader_known
        raft.elect("127.0.0.1:8002")
        self.reactor.advance(0)
        raft.elect("127.0.0.1:8003")
        self.reactor.advance(0)
        assert self.membership.map_current and heard == [False, True]
        self.stop()


class _DropSnapshots:
    """A listener that loses snapshots (a view that lags)."""

    def __init__(self, inner: RaftListener) -> None:
        self._inner = inner

    def on_snapshot(self, snapshot: ClusterSnapshot) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
