"""The Raft adapter (chashd.gateway.raft) without a Raft thread: settings, the reactor bridge, the numbering
of the replicated methods the journal records, and the snapshot's form (tests/integration/test_raft.py runs
ClusterRaft itself)."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import pytest
from pysyncobj import SyncObjConf
from pysyncobj.pickle import load as pysyncobj_load
from twisted.python.failure import Failure

from chashd.config import GatewayConfig, load_config
from chashd.errors import ConfigError
from chashd.gateway.clustermap import ClusterSnapshot, ClusterState, Outcome, OutcomeCode
from chashd.gateway.raft import (
    SUCCESS,
    ClusterRaft,
    RaftSettings,
    RaftStatus,
    ReactorBridge,
    _MapHolder,
    describe_failure,
    raft_settings,
)
from chashd.node import NodeInfo, NodeState

#: A Raft dump and journal written by the code before the cluster map had a module of its own (commit
#: 8f3fb5c), see tests/integration/test_raft.py.
LEGACY = Path(__file__).parent.parent / "data" / "raft-8f3fb5c"


def gateway_config(**values: Any) -> GatewayConfig:
    """A gateway config from option values, without the machine's environment."""
    return load_config(GatewayConfig, {"gateway_id": "g1", **values}, environ={})


class RaftSettingsTests:
    """raft_settings: peers, password rule, files."""

    def test_own_address_dropped_from_peers(self) -> None:
        """Listing every gateway on each of them is harmless: the own address is dropped, duplicates too."""
        config = gateway_config(raft_port="8001", peers="127.0.0.1:8001,127.0.0.1:8002,127.0.0.1:8002")
        settings = raft_settings(config)
        assert settings.self_address == "127.0.0.1:8001"
        assert settings.peers == ("127.0.0.1:8002",)

    def test_ipv6_addresses_lose_their_brackets(self) -> None:
        """pysyncobj splits at the last colon, so [::1]:8002 becomes ::1:8002."""
        config = gateway_config(advertise_host="::1", raft_port="8001", peers="[::1]:8002")
        settings = raft_settings(config)
        assert settings.self_address == "::1:8001" and settings.peers == ("::1:8002",)

    def test_password_passed_on(self) -> None:
        """The Raft password reaches the settings (check_secrets requires it where a gateway starts)."""
        settings = raft_settings(gateway_config(peers="10.1.2.3:8001", raft_password="s3cret"))
        assert settings.password == "s3cret"

    def test_cluster_raft_refuses_no_password(self) -> None:
        """ClusterRaft (the real pysyncobj object) is never built without a password, whatever the addresses."""
        with pytest.raises(ConfigError, match="--raft-password"):
            ClusterRaft(RaftSettings("127.0.0.1:1", ()), None)  # type: ignore[arg-type]

    def test_peer_spellings_kept(self) -> None:
        """Host names and addresses are kept as written."""
        settings = raft_settings(gateway_config(peers="localhost:8002,127.0.0.2:8003"))
        assert settings.peers == ("localhost:8002", "127.0.0.2:8003")

    def test_files_under_data_dir(self) -> None:
        """Journal and dump live under --data-dir; without it, memory only."""
        settings = raft_settings(gateway_config(data_dir="/var/lib/chashd"))
        assert settings.journal_file == "/var/lib/chashd/raft.journal"
        assert settings.dump_file == "/var/lib/chashd/raft.dump"
        assert raft_settings(gateway_config()).journal_file is None

    def test_design_settings(self) -> None:
        """connectionTimeout >= 10 s, a short DNS cache, a bind failure that is reported, and a leader that
        hears from no majority steps down within the longest election timeout (pysyncobj's raftMaxTimeout),
        not after pysyncobj's 30 s."""
        settings = raft_settings(gateway_config())
        assert settings.connection_timeout >= 10
        assert settings.dns_cache_time <= 10
        assert settings.max_bind_retries == 1
        assert settings.leader_fallback_timeout <= SyncObjConf().raftMaxTimeout
        assert settings.leader_fallback_timeout > SyncObjConf().appendEntriesPeriod * 3


class _Recorder:
    """A RaftListener that records the calls it gets."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def on_snapshot(self, snapshot: ClusterSnapshot) -> None:
        self.calls.append(("snapshot", (snapshot,)))

    def on_status(self, status: RaftStatus) -> None:
        self.calls.append(("status", (status,)))

    def on_ready(self) -> None:
        self.calls.append(("ready", ()))

    def on_command_done(self, token: int, outcome: Outcome | None, error: int) -> None:
        self.calls.append(("done", (token, outcome, error)))

    def on_failure(self, failure: Failure, what: str) -> None:
        self.calls.append(("failure", (failure, what)))


class ReactorBridgeTests:
    """ReactorBridge: every report goes through call_from_thread, none reaches the listener directly."""

    def test_every_report_is_handed_over(self) -> None:
        """The five reports are queued for the reactor, and reach the listener when the reactor runs them."""
        queued: list[tuple[Any, tuple[Any, ...]]] = []
        listener = _Recorder()
        bridge = ReactorBridge(lambda f, *args: queued.append((f, args)), listener)
        snapshot = ClusterSnapshot(1, (), ())
        outcome = Outcome(OutcomeCode.UPDATED, 1)
        failure = Failure(ValueError("boom"))
        bridge.on_snapshot(snapshot)
        bridge.on_status(RaftStatus("h:1", True, True))
        bridge.on_ready()
        bridge.on_command_done(7, outcome, SUCCESS)
        bridge.on_failure(failure, "ticking")
        assert listener.calls == [] and len(queued) == 5
        for f, args in queued:
            f(*args)
        assert listener.calls == [
            ("snapshot", (snapshot,)),
            ("status", (RaftStatus("h:1", True, True),)),
            ("ready", ()),
            ("done", (7, outcome, SUCCESS)),
            ("failure", (failure, "ticking")),
        ]


class _Deadline:
    """What ``ClusterRaft._heard_from_leader`` reads of a SyncObj: its election deadline, its connections."""

    def __init__(self, deadline: float | None, connected: bool = False) -> None:
        if deadline is not None:
            self._SyncObj__raftElectionDeadline = deadline
        self.connected = connected

    def isNodeConnected(self, node: object) -> bool:
        return self.connected


class LeaderContactTests:
    """A follower is in contact with its leader while its election deadline is ahead."""

    def test_deadline_ahead_or_past(self) -> None:
        """Ahead: heard from the leader within the election timeout; past: not (whatever the connection)."""
        from pysyncobj.monotonic import monotonic

        now = monotonic()
        assert ClusterRaft._heard_from_leader(_Deadline(now + 1.0), "leader")  # type: ignore[arg-type]
        assert not ClusterRaft._heard_from_leader(_Deadline(now - 0.1, connected=True), "leader")  # type: ignore[arg-type]

    def test_pysyncobj_keeps_the_deadline(self) -> None:
        """The private attribute read is the one pysyncobj's SyncObj sets (its name is mangled by class)."""
        import inspect

        from pysyncobj import SyncObj

        assert "self.__raftElectionDeadline = monotonicTime()" in inspect.getsource(SyncObj)

    def test_without_the_deadline(self) -> None:
        """A pysyncobj without the attribute: the connection to the leader decides."""
        assert ClusterRaft._heard_from_leader(_Deadline(None, connected=True), "leader")  # type: ignore[arg-type]
        assert not ClusterRaft._heard_from_leader(_Deadline(None), "leader")  # type: ignore[arg-type]


class ReplicatedMethodsTests:
    """ClusterRaft's @replicated methods, as pysyncobj numbers them in the journal."""

    def test_numbering_is_unchanged(self) -> None:
        """pysyncobj numbers the "<name>_v<ver>" copies of the replicated methods sorted by (ver, name); a
        journal entry holds that number and the arguments, so this list is fixed for every journal."""
        copies = sorted(
            (method.ver, name)
            for name in dir(ClusterRaft)
            if getattr(method := getattr(ClusterRaft, name), "replicated", False) and name != method.origName
        )
        assert [name for _, name in copies] == [
            "mark_down_v0",
            "mark_up_v0",
            "register_gateway_v0",
            "register_node_v0",
            "remove_v0",
            "set_weight_v0",
            "start_leaving_v0",
        ]

    def test_failure_reasons(self) -> None:
        """pysyncobj's FAIL_REASON codes read as sentences."""
        assert "leader changed" in describe_failure(5)
        assert "no Raft leader" in describe_failure(2)
        assert describe_failure(99) == "pysyncobj error 99"


class SnapshotFormTests:
    """What a Raft snapshot holds of the map (_MapHolder's part of the dump file)."""

    def test_plain_form(self) -> None:
        """The holder serializes the state's plain form and reads it back."""
        holder = _MapHolder()
        holder.state.register_node("a", "h", 1, 2, 100, 1)
        holder.state.mark_down("a")
        data = holder._serialize()
        assert data == {"map": (2, (("a", "h", 1, 2, 100, "down", 1),), ())}
        copy = _MapHolder()
        copy._deserialize(data)
        assert copy.state.snapshot() == holder.state.snapshot()

    def test_dump_of_the_code_before_the_split(self) -> None:
        """A dump written before the cluster map had a module of its own pickled the ClusterState object
        under chashd.gateway.membership: it still loads, and its node states become NodeState members."""
        with gzip.open(LEGACY / "raft.dump") as f:
            data = pysyncobj_load(f)
        holder = _MapHolder()
        holder._deserialize(data[0][1])
        snapshot = holder.state.snapshot()
        assert snapshot.epoch == 6
        assert [g.id for g in snapshot.gateways] == ["g1"]
        assert snapshot.nodes == tuple(
            NodeInfo(f"kv-{i}", "127.0.0.1", 9000 + 2 * i, 9001 + 2 * i, 100, NodeState.UP, 1) for i in range(5)
        )
        assert {type(n.state) for n in snapshot.nodes} == {NodeState}
        assert ClusterState.from_plain(holder._serialize()["map"]).snapshot() == snapshot
