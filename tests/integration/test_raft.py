"""ClusterRaft (chashd.gateway.raft) in this process, with its tick thread, on a real loopback port: journal
replay, the dump file, a journal written by older code, and a Raft port in use."""

from __future__ import annotations

import gzip
import io
import pickle
import queue
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from chashd.gateway.clustermap import ClusterSnapshot, GatewayInfo, Outcome, OutcomeCode
from chashd.gateway.raft import ClusterRaft, RaftSettings, RaftStatus
from chashd.launcher import free_ports
from chashd.node import NodeInfo, NodeState
from tests.integration.conftest import wait_until

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"

#: A Raft dump and journal written by the code of commit 8f3fb5c, before the cluster map had a module of its
#: own, by one gateway on 127.0.0.1:54851 with log compaction after 4 entries: register_gateway g1,
#: register_node kv-0 .. kv-5 (127.0.0.1, ports 9000 + 2i and 9001 + 2i, weight 100, seq 1), mark_down kv-5;
#: the dump holds epoch 6. Then, without compaction: register_node kv-6 (::1, 9100, 9101, weight 50, seq 3),
#: set_weight kv-1 250, mark_down kv-2, start_leaving kv-3, mark_up kv-5, remove kv-4, register_gateway g2
#: (127.0.0.1:1, http://127.0.0.1:8010): every operation in the journal once, epoch 15 at the end.
LEGACY = Path(__file__).parent.parent / "data" / "raft-8f3fb5c"

LEGACY_MAP = ClusterSnapshot(
    15,
    (
        NodeInfo("kv-0", HOST, 9000, 9001, 100, NodeState.UP, 1),
        NodeInfo("kv-1", HOST, 9002, 9003, 250, NodeState.UP, 1),
        NodeInfo("kv-2", HOST, 9004, 9005, 100, NodeState.DOWN, 1),
        NodeInfo("kv-3", HOST, 9006, 9007, 100, NodeState.LEAVING, 1),
        NodeInfo("kv-5", HOST, 9010, 9011, 100, NodeState.UP, 1),
        NodeInfo("kv-6", "::1", 9100, 9101, 50, NodeState.UP, 3),
    ),
    (
        GatewayInfo("g1", "127.0.0.1:54851", "http://127.0.0.1:8000"),
        GatewayInfo("g2", "127.0.0.1:1", "http://127.0.0.1:8010"),
    ),
)


class _NothingOfChashd(pickle.Unpickler):
    """Unpickles a dump file, refusing any class of chashd (pysyncobj's own classes are allowed)."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("chashd"):
            raise pickle.UnpicklingError(f"the dump names {module}.{name}")
        return super().find_class(module, name)


def dumped_map(directory: Path) -> Any:
    """The map's part of the dump file in ``directory`` (None while there is none, or an old one)."""
    try:
        with gzip.open(directory / "raft.dump") as f:
            data = _NothingOfChashd(io.BytesIO(f.read())).load()
    except (FileNotFoundError, pickle.UnpicklingError):
        return None
    return data[0][1].get("map")


class ClusterRaftTests:
    """ClusterRaft in this process, on a real loopback port: journal replay and the dump file."""

    class Listener:
        """Collects the Raft thread's reports in a thread-safe queue."""

        def __init__(self) -> None:
            self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
            self.latest: ClusterSnapshot | None = None

        def on_snapshot(self, snapshot: ClusterSnapshot) -> None:
            self.latest = snapshot
            self.events.put(("snapshot", snapshot))

        def on_status(self, status: RaftStatus) -> None:
            self.events.put(("status", status))

        def on_ready(self) -> None:
            self.events.put(("ready", None))

        def on_command_done(self, token: int, outcome: Outcome | None, error: int) -> None:
            self.events.put(("done", (token, outcome, error)))

        def on_failure(self, failure: Any, what: str) -> None:
            self.events.put(("failure", (failure, what)))

        def wait(self, kind: str, timeout: float = 30) -> Any:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    event, value = self.events.get(timeout=0.2)
                except queue.Empty:
                    continue
                assert event != "failure", value
                if event == kind:
                    return value
            raise AssertionError(f"no {kind} within {timeout}s")

    def _raft(self, tmp_path: Path, port: int, compaction: int = 5000) -> tuple[ClusterRaft, Listener]:
        settings = RaftSettings(
            f"{HOST}:{port}",
            (),
            password=secrets.token_hex(16),
            journal_file=str(tmp_path / "raft.journal"),
            dump_file=str(tmp_path / "raft.dump"),
            log_compaction_min_entries=compaction,
        )
        listener = self.Listener()
        return ClusterRaft.create(settings, listener), listener

    def _stop(self, raft: ClusterRaft) -> None:
        raft.destroy()
        wait_until("the tick thread to end", lambda: not raft.alive(), 10)

    def test_journal_replay_and_dump(self, tmp_path: Path) -> None:
        """Commands applied, a dump written by log compaction, then a new ClusterRaft on the same files
        comes back with the same map (from dump + journal), and is ready."""
        (port,) = free_ports(1)
        raft, listener = self._raft(tmp_path, port, compaction=10)
        try:
            listener.wait("ready")
            for i in range(25):
                raft.submit("register_node", (f"n{i:02d}", HOST, 9000 + i, 9500, 1 + i % 3, 1), i)
                _, outcome, error = listener.wait("done")
                assert error == 0 and outcome.code == OutcomeCode.REGISTERED
            raft.submit("mark_down", ("n03",), 99)
            assert listener.wait("done")[1].code == OutcomeCode.UPDATED
            wait_until("a dump file", lambda: dumped_map(tmp_path) is not None, 15)
            wait_until("the last snapshot", lambda: listener.latest is not None and listener.latest.epoch == 26)
            before = listener.latest
        finally:
            self._stop(raft)
        raft, listener = self._raft(tmp_path, port, compaction=10)
        try:
            listener.wait("ready")
            wait_until("the replayed map", lambda: listener.latest is not None and listener.latest.epoch == 26)
            assert listener.latest == before
            raft.submit("mark_down", ("n03",), 1)
            assert listener.wait("done")[1].code == OutcomeCode.UNCHANGED
        finally:
            self._stop(raft)

    def test_journal_of_older_code(self, tmp_path: Path) -> None:
        """The dump and journal of LEGACY (every operation in the journal, the dump naming the classes of
        chashd.gateway.membership) replay to the map they were written with; the next operation follows,
        the next dump holds the plain form and no chashd class, and a restart from it gives the same map."""
        for name in ("raft.dump", "raft.journal", "raft.journal.meta"):
            shutil.copy(LEGACY / name, tmp_path / name)
        assert dumped_map(tmp_path) is None  # the old dump cannot be read without chashd's classes
        (port,) = free_ports(1)
        raft, listener = self._raft(tmp_path, port, compaction=2)
        try:
            listener.wait("ready")
            wait_until("the replayed map", lambda: listener.latest is not None and listener.latest.epoch >= 15)
            assert listener.latest == LEGACY_MAP
            raft.submit("mark_down", ("kv-0",), 1)
            assert listener.wait("done")[1] == Outcome(OutcomeCode.UPDATED, 16)
            wait_until("a dump of epoch 16", lambda: (dumped_map(tmp_path) or (0,))[0] == 16, 15)
            # The dump can be written in the tick that applied the command, before that tick's report.
            wait_until("the report of epoch 16", lambda: listener.latest is not None and listener.latest.epoch == 16)
            after = listener.latest
        finally:
            self._stop(raft)
        assert after is not None and after.nodes[0].state == NodeState.DOWN
        raft, listener = self._raft(tmp_path, port)
        try:
            listener.wait("ready")
            wait_until("the replayed map", lambda: listener.latest is not None and listener.latest.epoch >= 16)
            assert listener.latest == after
        finally:
            self._stop(raft)

    def test_port_in_use_is_reported(self, tmp_path: Path) -> None:
        """A Raft port that cannot be bound leaves the object broken (Membership then stops the daemon)."""
        with socket.socket() as taken:
            taken.bind((HOST, 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            raft, _ = self._raft(tmp_path, port)
            wait_until("the tick thread to give up", raft.broken, 10)
            raft.destroy()
