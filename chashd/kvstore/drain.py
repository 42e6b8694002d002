"""A kvstore's end: the drain, and the daemon's top service that runs it before anything stops.

``KVStoreRoot`` is the kvstore daemon's top service (``chashd.kvstore.tap`` builds it around the node).
twistd stops it when the process is asked to end (SIGTERM): it runs the node's drain first, while every
child keeps running (the listeners too: a leaving node is still read during its handoff), then stops the
children. ``drain()`` is idempotent: every caller waits for the same drain.

The drain (``Drain``) runs for a node the gateways know (it is in the newest ring the ring watch learned,
or a gateway accepted its registration); a node they do not know just stops. Its steps:

1. stop the periodic registration (it would add the node back after its removal);
2. ask a gateway to mark the node ``leaving`` (``POST /ring/nodes/{id}/drain`` through the node's cluster
   client, which answers the epoch of the map that has the node leaving), again with backoff until a gateway
   takes it (or answers 404: the map does not know the node; the handoff's newest ring then stands for that
   epoch);
3. refuse writes (``LocalBackend.leaving``; ``GET /ready`` reports the node not ready) and tell systemd
   ``STOPPING=1``;
4. wait until the handoff's ``synced`` ring is of that epoch or later and does not hold the node: the node
   is in no arc's new preference list, so it pushed and dropped everything;
5. deregister (``DELETE /ring/nodes/{id}``, tried like step 2).

The drain fails when it does not finish within ``--drain-timeout`` or when the daemon gets a second
SIGTERM (``handle_signals``, set for the daemon's process only), logging what was left (arcs, records not
pushed, records held); the process then exits with status 1 once the reactor has stopped.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from chashd.client import AsyncKVStoreClient, ChashError, NotFound
from chashd.kvstore.handoff import Handoff
from chashd.kvstore.placement import RingUpdate
from chashd.kvstore.registration import backoff_delay
from chashd.kvstore.service import KVStoreService

__all__ = ["Drain", "KVStoreRoot"]


class KVStoreRoot(MultiService):
    """The kvstore daemon's top service, parent of ``node``: stopping it drains the node, then stops the
    children (see the module docstring).

    ``notify_stopping`` is called when the node starts leaving (the systemd notifier's ``stopping``);
    ``exit_status(status)`` ends the process with ``status`` once the reactor has stopped (tests pass their
    own); ``handle_signals`` makes a second SIGTERM during the drain give it up.
    """

    _log = Logger()

    def __init__(
        self,
        node: KVStoreService,
        reactor: Any,
        handle_signals: bool = False,
        notify_stopping: Callable[[], None] | None = None,
        exit_status: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__()
        self.node = node
        node.setServiceParent(self)
        self._reactor = reactor
        self._handle_signals = handle_signals
        self._notify_stopping = notify_stopping or (lambda: None)
        self._exit_status = exit_status or self._exit_after_shutdown
        #: The drain under way or done (None before one was needed).
        self.drainer: Drain | None = None
        self._drain_done: bool | None = None  # None: not started, False: under way, True: over
        self._drain_waiters: list[Deferred[None]] = []

    def stopService(self) -> Deferred[None]:
        drained = self.drain()
        drained.addBoth(lambda _: MultiService.stopService(self))
        return drained

    def drain(self) -> Deferred[None]:
        """Hand everything off (``Drain``) when the gateways know the node; fires once that is over, also
        when it failed (the exit status is then 1)."""
        if self._drain_done is None:
            self._drain_done = False
            try:
                started = self._start_drain()
            except Exception:
                self._log.failure("cannot start the drain")
                started = succeed(None)
            started.addErrback(lambda f: self._log.failure("the drain failed", f)).addBoth(self._drained)
        if self._drain_done:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._drain_waiters.append(waiter)
        return waiter

    def _drained(self, _: object) -> None:
        self._drain_done = True
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _known_to_gateways(self) -> bool:
        node = self.node
        watch = node.ring_watch
        latest = watch.latest if watch is not None else None
        node_id = node.config.node_id
        if latest is not None and (node_id in latest.nodes or node_id in latest.leaving):
            return True
        return node.registrar is not None and node.registrar.registered_with is not None

    def _start_drain(self) -> Deferred[None]:
        node = self.node
        if node.registrar is None or not self._known_to_gateways():
            self._log.info("stopping without a drain: {node_id} is not registered", node_id=node.config.node_id)
            return succeed(None)
        assert node.cluster is not None  # there is a registrar
        self.drainer = Drain(
            node.config.node_id,
            node.cluster,
            node.handoff,
            self._reactor,
            node.config.drain_timeout,
            stop_registering=node.registrar.stopService,
            leaving=self._leaving,
        )
        if self._handle_signals:
            signal.signal(signal.SIGTERM, self._second_signal)
        return self.drainer.start().addCallback(self._drain_result)

    def _leaving(self) -> None:
        self.node.backend.leaving = True
        self._notify_stopping()

    def _drain_result(self, ok: bool) -> None:
        if not ok:
            self._exit_status(1)

    def _second_signal(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM during the drain (a signal handler: it hands the abort to the reactor thread)."""
        if self.drainer is not None:
            self._reactor.callFromThread(self.drainer.abort, "a second SIGTERM")

    def _exit_after_shutdown(self, status: int) -> None:
        """End the process with ``status`` once the reactor has stopped (the services closed their files)."""

        def _exit() -> None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)

        self._reactor.addSystemEventTrigger("after", "shutdown", _exit)


class Drain:
    """A node's drain (see the module docstring). ``start()`` returns a Deferred firing True once the node
    was handed off and deregistered, False when the timeout passed or ``abort()`` was called first.

    ``stop_registering`` stops the periodic announcements (which would add the node back after its
    removal); ``leaving`` makes the node refuse writes and tells systemd ``STOPPING=1``.
    """

    _log = Logger()
    max_backoff = 5.0

    def __init__(
        self,
        node_id: str,
        client: AsyncKVStoreClient,
        handoff: Handoff,
        clock: IReactorTime,
        timeout: float,
        stop_registering: Callable[[], object],
        leaving: Callable[[], None],
        rng: random.Random | None = None,
    ) -> None:
        self.node_id = node_id
        self._client = client
        self._handoff = handoff
        self._clock = clock
        self.timeout = timeout
        self._stop_registering = stop_registering
        self._leaving = leaving
        self._rng = rng or random.Random()
        self._result: Deferred[bool] | None = None
        self._steps: Deferred[None] | None = None
        self._timer: IDelayedCall | None = None
        self.step = "not started"

    def start(self) -> Deferred[bool]:
        """Start the drain (once); the Deferred fires True when done, False when it failed."""
        if self._result is not None:
            raise RuntimeError("the drain was already started")
        self._result = Deferred()
        self._log.info("draining {node}: handing its data off before it stops", node=self.node_id)
        self._timer = self._clock.callLater(self.timeout, self._fail, f"not finished within {self.timeout:g}s")
        self._steps = Deferred.fromCoroutine(self._run())
        self._steps.addCallbacks(self._done, self._broke)
        return self._result

    def abort(self, reason: str) -> None:
        """Give up now (a second SIGTERM)."""
        self._fail(reason)

    async def _run(self) -> None:
        self._stop_registering()
        self.step = "asking to be marked leaving"
        answer = await self._ask("marking it leaving", self._client.drain)
        epoch = answer.get("epoch") if isinstance(answer, dict) else None
        if not isinstance(epoch, int):  # the map does not know the node: hand off to the newest ring
            target = self._handoff.target
            epoch = target.epoch if target is not None else 0
        self._leaving()
        self.step = f"handing off (to a ring of epoch {epoch} or later without this node)"
        self._log.info("{node} is leaving at epoch {epoch}; handing off", node=self.node_id, epoch=epoch)
        node_id = self.node_id

        def without_this_node(synced: RingUpdate) -> bool:
            return synced.epoch >= epoch and node_id not in synced.ring

        await self._handoff.when_synced(without_this_node)
        self.step = "deregistering"
        await self._ask("deregistering it", self._client.remove)

    async def _ask(self, what: str, send: Callable[[str], Deferred[dict[str, Any]]]) -> dict[str, Any] | None:
        """``send(node_id)`` (a call of the cluster client) until a gateway takes it: its answer, or None
        when the map does not know the node (404). Tries again with backoff after any other failure."""
        failures = 0
        while True:
            try:
                return await send(self.node_id)
            except NotFound:
                return None
            except ChashError as e:
                error = str(e)
            failures += 1
            delay = backoff_delay(failures, 0.25, self.max_backoff, self._rng)
            self._log.warn(
                "drain: {what} failed ({error}); trying again in {delay:.1f}s", what=what, error=error, delay=delay
            )
            await deferLater(self._clock, delay)

    def _done(self, _: object) -> None:
        if self._result is None or self._result.called:
            return
        self._cancel_timer()
        self._log.info("{node} drained and deregistered", node=self.node_id)
        self._result.callback(True)

    def _broke(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            return
        self._log.failure("the drain failed", failure)
        self._fail(f"failed while {self.step}: {failure.getErrorMessage()}")

    def _fail(self, reason: str) -> None:
        if self._result is None or self._result.called:
            return
        self._cancel_timer()
        status = self._handoff.status()
        self._log.critical(
            "drain of {node} gave up ({reason}) while {step}: {arcs_left} of {arcs} arcs left, "
            "about {pending} records not pushed, {held} records held",
            node=self.node_id,
            reason=reason,
            step=self.step,
            arcs_left=status["arcs_total"] - status["arcs_done"],
            arcs=status["arcs_total"],
            pending=status["pending"],
            held=self._handoff.held,
        )
        result = self._result
        if self._steps is not None and not self._steps.called:
            self._steps.cancel()
        result.callback(False)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
