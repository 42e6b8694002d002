"""chashd.node: a node's JSON form and its state."""

from __future__ import annotations

import json

import pytest

from chashd.node import NodeInfo, NodeState


class NodeInfoTests:
    """``NodeInfo.to_dict`` and ``NodeInfo.from_dict``."""

    def test_round_trip_through_json(self) -> None:
        """What ``to_dict`` writes, ``from_dict`` reads back equal, the state as the StrEnum."""
        node = NodeInfo("kv-a", "127.0.0.5", 8080, 11212, 100, NodeState.LEAVING, 17)
        back = NodeInfo.from_dict(json.loads(json.dumps(node.to_dict())))
        assert back == node and back.state is NodeState.LEAVING

    def test_seq_and_state_may_be_missing(self) -> None:
        """The nodes of ``GET /ring`` carry no seq; a node without a state is up."""
        node = NodeInfo.from_dict({"id": "a", "host": "h", "port": 1, "line_port": 2, "weight": 3})
        assert node == NodeInfo("a", "h", 1, 2, 3, NodeState.UP, 0)

    @pytest.mark.parametrize(
        ("item", "words"),
        [
            ({"host": "h", "port": 1, "line_port": 2, "weight": 3}, "no id"),
            ({"id": "a", "port": 1, "line_port": 2, "weight": 3}, "no host"),
            ({"id": "a", "host": "h", "port": "1", "line_port": 2, "weight": 3}, "port '1'"),
            ({"id": "a", "host": "h", "port": 1, "line_port": True, "weight": 3}, "line_port True"),
            ({"id": "a", "host": "h", "port": 1, "line_port": 2}, "weight None"),
            ({"id": "a", "host": "h", "port": 1, "line_port": 2, "weight": 3, "seq": -1}, "seq -1"),
            ({"id": "a", "host": "h", "port": 1, "line_port": 2, "weight": 3, "state": "gone"}, "unknown state"),
        ],
    )
    def test_malformed(self, item: dict[str, object], words: str) -> None:
        """A field missing or of the wrong kind is a ValueError naming it."""
        with pytest.raises(ValueError, match=words):
            NodeInfo.from_dict(item)

    def test_states_compare_with_their_json_form(self) -> None:
        """A state read from JSON compares equal to the enum member (code compares with NodeState)."""
        assert json.loads(json.dumps({"state": NodeState.DOWN}))["state"] == NodeState.DOWN
