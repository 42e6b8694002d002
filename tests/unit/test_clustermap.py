"""The cluster map (chashd.gateway.clustermap): the pure state machine, its operations and plain form, and
the view derived from it."""

from __future__ import annotations

import io
import json
import pickle
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chashd.gateway.clustermap import (
    OPERATIONS,
    ClusterState,
    ClusterView,
    GatewayInfo,
    Outcome,
    OutcomeCode,
    apply_operation,
)
from chashd.node import NodeInfo, NodeState
from chashd.ring import HashRing


def register(state: ClusterState, node_id: str = "a", **kw: Any) -> Outcome:
    """Register a node with defaults for what the test does not care about."""
    args: dict[str, Any] = {"host": "10.0.0.1", "port": 8080, "line_port": 11212, "weight": 100, "seq": 1} | kw
    return state.register_node(node_id, args["host"], args["port"], args["line_port"], args["weight"], args["seq"])


# -- the state machine ---------------------------------------------------------------------------------


class ClusterStateTests:
    """ClusterState: every real change bumps the epoch, nothing else does."""

    def test_register_new_node(self) -> None:
        """A new node is registered up, and the epoch goes from 0 to 1."""
        state = ClusterState()
        outcome = register(state)
        assert outcome == Outcome(OutcomeCode.REGISTERED, 1)
        assert state.nodes["a"] == NodeInfo("a", "10.0.0.1", 8080, 11212, 100, NodeState.UP, 1)

    def test_identical_announcement_changes_nothing(self) -> None:
        """The same announcement again is 'unchanged' and keeps the epoch."""
        state = ClusterState()
        register(state)
        assert register(state) == Outcome(OutcomeCode.UNCHANGED, 1)
        assert state.epoch == 1

    def test_older_identical_announcement_is_unchanged(self) -> None:
        """A replayed older announcement with the same data is harmless."""
        state = ClusterState()
        register(state, seq=5)
        assert register(state, seq=3).code == OutcomeCode.UNCHANGED

    def test_stale_seq_with_other_data_is_rejected(self) -> None:
        """A seq not greater than the last one, with different data, is stale and changes nothing."""
        state = ClusterState()
        register(state, seq=5)
        outcome = register(state, seq=5, weight=200)
        assert outcome.code == OutcomeCode.STALE and outcome.epoch == 1 and "seq 5" in outcome.detail
        assert register(state, seq=4, port=9).code == OutcomeCode.STALE
        assert state.nodes["a"].weight == 100

    def test_newer_seq_updates(self) -> None:
        """A higher seq with a new weight is applied."""
        state = ClusterState()
        register(state, seq=1)
        assert register(state, seq=2, weight=300) == Outcome(OutcomeCode.UPDATED, 2)
        assert state.nodes["a"].weight == 300 and state.nodes["a"].seq == 2

    def test_same_id_other_address_while_up_conflicts(self) -> None:
        """Another address for an id that is up is a conflict, even with a higher seq."""
        state = ClusterState()
        register(state, seq=1)
        outcome = register(state, seq=2, host="10.0.0.2")
        assert outcome.code == OutcomeCode.CONFLICT and "10.0.0.1:8080" in outcome.detail
        assert state.nodes["a"].host == "10.0.0.1" and state.epoch == 1

    def test_same_id_other_address_while_leaving_conflicts(self) -> None:
        """A leaving node's id cannot be taken by another address either."""
        state = ClusterState()
        register(state, seq=1)
        state.start_leaving("a")
        assert register(state, seq=2, port=9090).code == OutcomeCode.CONFLICT

    def test_node_back_from_down_with_higher_seq(self) -> None:
        """A down node coming back with a higher seq (even from another address) is accepted and up."""
        state = ClusterState()
        register(state, seq=1)
        state.mark_down("a")
        outcome = register(state, seq=2, host="10.0.0.9")
        assert outcome.code == OutcomeCode.UPDATED
        assert state.nodes["a"].state == NodeState.UP and state.nodes["a"].host == "10.0.0.9"

    def test_restart_at_same_address_is_up(self) -> None:
        """A restarted node (higher seq, same address) is up again even if it was leaving."""
        state = ClusterState()
        register(state, seq=1)
        state.start_leaving("a")
        assert register(state, seq=2).code == OutcomeCode.UPDATED
        assert state.nodes["a"].state == NodeState.UP

    def test_down_node_same_seq_stays_down(self) -> None:
        """A periodic re-announcement (same seq) does not bring a down node up: the probes do."""
        state = ClusterState()
        register(state)
        state.mark_down("a")
        assert register(state).code == OutcomeCode.UNCHANGED
        assert state.nodes["a"].state == NodeState.DOWN

    @pytest.mark.parametrize(
        ("field", "value"),
        [("weight", 0), ("weight", -5), ("weight", True), ("port", 0), ("line_port", 70000), ("seq", -1)],
    )
    def test_invalid_registration(self, field: str, value: Any) -> None:
        """Bad numbers are refused without a change."""
        state = ClusterState()
        outcome = register(state, **{field: value})
        assert outcome.code == OutcomeCode.INVALID and outcome.epoch == 0
        assert state.nodes == {}

    def test_invalid_ids(self) -> None:
        """Empty, spaced or non-string ids are refused."""
        state = ClusterState()
        for bad in ("", "a b", 7, "x" * 65):
            assert register(state, node_id=bad).code == OutcomeCode.INVALID  # type: ignore[arg-type]

    def test_state_transitions(self) -> None:
        """down, up, leaving: each real transition bumps the epoch; repeats are unchanged."""
        state = ClusterState()
        register(state)
        assert state.mark_down("a") == Outcome(OutcomeCode.UPDATED, 2)
        assert state.mark_down("a") == Outcome(OutcomeCode.UNCHANGED, 2)
        assert state.mark_up("a") == Outcome(OutcomeCode.UPDATED, 3)
        assert state.mark_up("a") == Outcome(OutcomeCode.UNCHANGED, 3)
        assert state.start_leaving("a") == Outcome(OutcomeCode.UPDATED, 4)
        assert state.start_leaving("a") == Outcome(OutcomeCode.UNCHANGED, 4)

    def test_leaving_node_stays_leaving(self) -> None:
        """mark_up and mark_down leave a draining node alone."""
        state = ClusterState()
        register(state)
        state.start_leaving("a")
        assert state.mark_up("a").code == OutcomeCode.UNCHANGED
        assert state.mark_down("a").code == OutcomeCode.UNCHANGED
        assert state.nodes["a"].state == NodeState.LEAVING

    def test_down_node_can_leave(self) -> None:
        """A down node can be drained."""
        state = ClusterState()
        register(state)
        state.mark_down("a")
        assert state.start_leaving("a").code == OutcomeCode.UPDATED

    def test_unknown_node(self) -> None:
        """Every per-node operation on an unknown id is 'unknown' and changes nothing."""
        state = ClusterState()
        for outcome in (
            state.mark_down("x"),
            state.mark_up("x"),
            state.start_leaving("x"),
            state.remove("x"),
            state.set_weight("x", 5),
        ):
            assert outcome.code == OutcomeCode.UNKNOWN and "'x'" in outcome.detail
        assert state.epoch == 0

    def test_remove(self) -> None:
        """Removing forgets the node (and its seq: it may register again from scratch)."""
        state = ClusterState()
        register(state, seq=9)
        assert state.remove("a") == Outcome(OutcomeCode.REMOVED, 2)
        assert "a" not in state.nodes
        assert register(state, seq=1).code == OutcomeCode.REGISTERED

    def test_set_weight(self) -> None:
        """set_weight changes the weight once; zero is invalid."""
        state = ClusterState()
        register(state)
        assert state.set_weight("a", 7) == Outcome(OutcomeCode.UPDATED, 2)
        assert state.set_weight("a", 7).code == OutcomeCode.UNCHANGED
        assert state.set_weight("a", 0).code == OutcomeCode.INVALID

    def test_register_gateway(self) -> None:
        """Gateways register once; a new Raft address replaces the old entry; one entry per address."""
        state = ClusterState()
        assert state.register_gateway("g1", "h:1", "http://h:8000") == Outcome(OutcomeCode.REGISTERED, 1)
        assert state.register_gateway("g1", "h:1", "http://h:8000").code == OutcomeCode.UNCHANGED
        assert state.register_gateway("g1", "h:1", "http://h:9000").code == OutcomeCode.UPDATED
        assert state.register_gateway("g2", "h:1", "http://h:9000").code == OutcomeCode.REGISTERED
        assert list(state.gateways) == ["g2"]

    def test_apply_operation_never_raises(self) -> None:
        """Unknown operations, wrong arities and type errors give outcomes, not exceptions."""
        state = ClusterState()
        assert apply_operation(state, "nope", ()).code == OutcomeCode.INVALID
        assert apply_operation(state, "remove", ()).code == OutcomeCode.INVALID
        assert apply_operation(state, "mark_down", ([],)).code == OutcomeCode.FAILED  # unhashable id
        assert state.epoch == 0


class _NoGlobals(pickle.Unpickler):
    """Unpickles values of builtin types only: any class or function is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name} is not a builtin value")


def varied_state() -> ClusterState:
    """A map with a node in every state and two gateways."""
    state = ClusterState()
    register(state, "a")
    register(state, "b", port=2, weight=7, seq=4)
    register(state, "c", host="::1", port=3)
    state.mark_down("b")
    state.start_leaving("c")
    state.register_gateway("g1", "h:1", "http://h:8000")
    state.register_gateway("g2", "h:2", "http://h:8001")
    return state


class PlainFormTests:
    """ClusterState.to_plain()/from_plain(): what Raft snapshots store."""

    def test_round_trip(self) -> None:
        """from_plain(to_plain()) gives the same map, node states as NodeState members."""
        state = varied_state()
        copy = ClusterState.from_plain(state.to_plain())
        assert copy.snapshot() == state.snapshot() and copy.epoch == state.epoch == 7
        assert [type(n.state) for n in copy.snapshot().nodes] == [NodeState] * 3
        assert register(copy, "b", port=2, weight=7, seq=4) == Outcome(OutcomeCode.UNCHANGED, 7)

    def test_builtin_values_only(self) -> None:
        """The plain form pickles without naming a class, so a snapshot does not depend on this module."""
        plain = varied_state().to_plain()
        data = pickle.dumps(plain, protocol=2)
        assert _NoGlobals(io.BytesIO(data)).load() == plain
        assert plain[1][1] == ("b", "10.0.0.1", 2, 11212, 7, "down", 4)
        assert type(plain[1][1][5]) is str

    def test_unknown_state_is_refused(self) -> None:
        """A plain form with a state this code does not know raises ValueError."""
        with pytest.raises(ValueError, match="gone"):
            ClusterState.from_plain((1, (("a", "h", 1, 2, 100, "gone", 1),), ()))


class OperationsTests:
    """OPERATIONS: the operations of the map, as the Raft journal records them."""

    def test_the_operations(self) -> None:
        """Seven operations, each with the parameters of its ClusterState method and ver 0."""
        assert {name: (op.params, op.ver) for name, op in OPERATIONS.items()} == {
            "mark_down": (("node_id",), 0),
            "mark_up": (("node_id",), 0),
            "register_gateway": (("gateway_id", "raft", "url"), 0),
            "register_node": (("node_id", "host", "port", "line_port", "weight", "seq"), 0),
            "remove": (("node_id",), 0),
            "set_weight": (("node_id", "weight"), 0),
            "start_leaving": (("node_id",), 0),
        }

    def test_apply_operation_runs_the_method(self) -> None:
        """apply_operation(name, args) is the ClusterState method called with args."""
        by_name, direct = varied_state(), varied_state()
        assert apply_operation(by_name, "set_weight", ("a", 3)) == direct.set_weight("a", 3)
        assert by_name.snapshot() == direct.snapshot()


class WireNamesTests:
    """Node states and outcome codes are StrEnums whose values are the JSON strings."""

    def test_node_states(self) -> None:
        """up, down, leaving: equal to their strings, and their strings in JSON."""
        assert [s.value for s in NodeState] == ["up", "down", "leaving"]
        assert NodeState.DOWN == "down"  # type: ignore[comparison-overlap]  # the point: a StrEnum equals its string
        assert NodeState("leaving") is NodeState.LEAVING
        node = NodeInfo("a", "h", 1, 2, 100, NodeState.DOWN, 3)
        assert json.dumps(node.to_dict()) == (
            '{"id": "a", "host": "h", "port": 1, "line_port": 2, "weight": 100, "state": "down", "seq": 3}'
        )

    def test_outcome_codes(self) -> None:
        """The codes of the admin routes' "result"; only registered, updated and removed are changes."""
        assert {c.value for c in OutcomeCode} == {
            "registered",
            "updated",
            "removed",
            "unchanged",
            "unknown",
            "conflict",
            "stale",
            "invalid",
            "failed",
        }
        assert {c for c in OutcomeCode if Outcome(c, 1).changed} == {"registered", "updated", "removed"}
        assert json.dumps({"result": OutcomeCode.STALE}) == '{"result": "stale"}'


_node_ids = st.sampled_from(["a", "b", "c", "d"])
_operations = st.one_of(
    st.tuples(
        st.just("register_node"),
        st.tuples(
            _node_ids,
            st.sampled_from(["h1", "h2"]),
            st.sampled_from([1, 2]),
            st.just(3),
            st.integers(-1, 3),
            st.integers(0, 4),
        ),
    ),
    st.tuples(st.sampled_from(["mark_down", "mark_up", "start_leaving", "remove"]), st.tuples(_node_ids)),
    st.tuples(st.just("set_weight"), st.tuples(_node_ids, st.integers(0, 3))),
    st.tuples(
        st.just("register_gateway"),
        st.tuples(st.sampled_from(["g1", "g2"]), st.sampled_from(["h:1", "h:2"]), st.sampled_from(["u1", "u2"])),
    ),
)


class ClusterStatePropertyTests:
    """Properties of any sequence of operations."""

    @settings(max_examples=200, deadline=None)
    @given(st.lists(_operations, max_size=40))
    def test_epoch_counts_changes_and_replay_is_deterministic(self, ops: list[tuple[str, tuple[Any, ...]]]) -> None:
        """The epoch rises by one exactly on a change; replaying the log gives the same map; applying
        each command a second time right away changes nothing (every command is idempotent); the plain
        form gives the same map back."""
        first, second = ClusterState(), ClusterState()
        for op, args in ops:
            before = first.epoch
            outcome = apply_operation(first, op, args)
            assert first.epoch == before + (1 if outcome.changed else 0)
            assert outcome.epoch == first.epoch
            again = apply_operation(first, op, args)
            assert not again.changed and first.epoch == outcome.epoch
            apply_operation(second, op, args)
            apply_operation(second, op, args)
        assert first.snapshot() == second.snapshot()
        assert ClusterState.from_plain(first.to_plain()).snapshot() == first.snapshot()
        for node in first.nodes.values():
            assert node.weight >= 1 and node.state in (NodeState.UP, NodeState.DOWN, NodeState.LEAVING)


# -- the view ------------------------------------------------------------------------------------------


class ClusterViewTests:
    """ClusterView: the ring of up and down nodes, the previous ring."""

    def test_ring_holds_up_and_down_nodes(self) -> None:
        """Leaving nodes own nothing; down nodes keep their arcs; the ring carries the epoch."""
        state = ClusterState()
        register(state, "a")
        register(state, "b", port=2)
        register(state, "c", port=3)
        state.mark_down("b")
        state.start_leaving("c")
        view = ClusterView.build(state.snapshot(), 160, None)
        assert view.ring.nodes == ("a", "b")
        assert view.ring.epoch == state.epoch == view.epoch
        assert view.ring.points_per_node == 160
        assert view.states == {"a": NodeState.UP, "b": NodeState.DOWN, "c": NodeState.LEAVING}
        assert [n.id for n in view.nodes_in(NodeState.LEAVING)] == ["c"]
        assert view.node("b") == state.nodes["b"] and view.node("zz") is None

    def test_weights_and_points(self) -> None:
        """The ring uses each node's weight and the configured points per node."""
        state = ClusterState()
        register(state, "a", weight=1)
        register(state, "b", port=2, weight=3)
        view = ClusterView.build(state.snapshot(), 40, None)
        assert view.ring == HashRing({"a": 1, "b": 3}, epoch=2, points_per_node=40)

    def test_previous_ring_tracks_placement_changes(self) -> None:
        """previous_ring is the ring before the last change of placement; down/up keep it."""
        state = ClusterState()
        register(state, "a")
        v1 = ClusterView.build(state.snapshot(), 160, ClusterView.empty(160))
        register(state, "b", port=2)
        v2 = ClusterView.build(state.snapshot(), 160, v1)
        assert v2.previous_ring is v1.ring
        state.mark_down("b")
        v3 = ClusterView.build(state.snapshot(), 160, v2)
        assert v3.previous_ring is v1.ring
        state.start_leaving("b")
        v4 = ClusterView.build(state.snapshot(), 160, v3)
        assert v4.previous_ring is v3.ring and v4.ring.nodes == ("a",)

    def test_gateway_at(self) -> None:
        """The gateway registered at a Raft address."""
        view = ClusterView(1, (), (GatewayInfo("g1", "h:1", "u"),), HashRing({}))
        assert view.gateway_at("h:1") == GatewayInfo("g1", "h:1", "u")
        assert view.gateway_at("h:2") is None and view.gateway_at(None) is None
