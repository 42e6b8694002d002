# -*- test-case-name: tests.unit.test_membership -*-
"""Test doubles for the gateway's control plane, as ``twisted.internet.testing`` holds Twisted's.

``LocalRaft`` stands in for ``chashd.gateway.raft.ClusterRaft`` under ``Membership``: the real
``ClusterState`` and the real operations, applied at once on the caller's thread, with no thread, socket or
pysyncobj object of its own. It reports to its listener synchronously (a test reactor's ``callFromThread``
decides when ``Membership`` sees the reports).
"""

from __future__ import annotations

from typing import Any

from chashd.gateway.clustermap import ClusterState, apply_operation
from chashd.gateway.raft import SUCCESS, RaftListener, RaftSettings, RaftStatus

__all__ = ["LocalRaft"]


class LocalRaft:
    """An in-memory Raft object: this gateway leads a group of one (unless ``leader=False``), and each
    submitted operation is applied to ``state`` at once. For tests of everything above the Raft layer (the
    API, the health checker, the wiring).

    ``hold()`` keeps submitted commands pending until ``release()`` (or ``fail_held(reason)``), and
    ``elect(address)`` changes the reported leader, so tests can play timeouts and leader changes.
    """

    def __init__(
        self, settings: RaftSettings, listener: RaftListener, state: ClusterState | None = None, leader: bool = True
    ) -> None:
        self.settings = settings
        self.listener = listener
        self.state = state or ClusterState()
        self.submitted: list[tuple[str, tuple[Any, ...]]] = []
        self.held: list[tuple[str, tuple[Any, ...], int]] | None = None
        self.destroyed = False
        self._ready = False
        self.leader: str | None = None
        self.listener.on_snapshot(self.state.snapshot())
        if leader:
            self.elect(settings.self_address)

    def elect(self, address: str | None) -> None:
        """Report ``address`` as the leader (None: no leader); this gateway leads when it is its own."""
        is_leader = address == self.settings.self_address
        self.leader = address
        self.listener.on_status(RaftStatus(address, is_leader, address is not None, address is not None))
        if address is not None and not self._ready:
            self._ready = True
            self.listener.on_ready()

    def lose_contact(self) -> None:
        """Report the leader as still named but not heard from within the election timeout (a follower cut
        off from every other gateway: pysyncobj starts no election then)."""
        self.listener.on_status(RaftStatus(self.leader, False, False, False))

    def submit(self, op: str, args: tuple[Any, ...], token: int) -> None:
        """Apply at once (or hold)."""
        self.submitted.append((op, args))
        if self.held is not None:
            self.held.append((op, args, token))
            return
        self._apply(op, args, token)

    def _apply(self, op: str, args: tuple[Any, ...], token: int) -> None:
        before = self.state.epoch
        outcome = apply_operation(self.state, op, args)
        self.listener.on_command_done(token, outcome, SUCCESS)
        if self.state.epoch != before:
            self.listener.on_snapshot(self.state.snapshot())

    def hold(self) -> None:
        """Keep commands pending from now on."""
        if self.held is None:
            self.held = []

    def release(self) -> None:
        """Apply the held commands and stop holding."""
        held, self.held = self.held or [], None
        for op, args, token in held:
            self._apply(op, args, token)

    def fail_held(self, reason: int) -> None:
        """Fail the held commands with a pysyncobj ``FAIL_REASON`` and stop holding."""
        held, self.held = self.held or [], None
        for _, _, token in held:
            self.listener.on_command_done(token, None, reason)

    def destroy(self) -> None:
        """Nothing runs; remember it was called."""
        self.destroyed = True

    def alive(self) -> bool:
        """Never a thread."""
        return False

    def broken(self) -> bool:
        """Never broken."""
        return False
