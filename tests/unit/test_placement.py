"""The ring as a kvstore knows it (chashd.kvstore.placement): RingUpdate from ``GET /ring``, and the saved ring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chashd.kvstore.placement import RingUpdate, load_synced, save_synced
from chashd.node import NodeInfo, NodeState
from chashd.ring import HashRing


def ring_body(**extra: object) -> dict[str, object]:
    """A ``GET /ring`` body of two nodes with their addresses (``extra`` replaces fields)."""
    body: dict[str, object] = HashRing({"a": 1, "b": 2}, epoch=7, points_per_node=16).to_dict()
    body["replicas"] = 2
    body["nodes"] = [
        {"id": "a", "weight": 1, "host": "127.0.0.1", "port": 8080, "line_port": 11212, "state": "up"},
        {"id": "b", "weight": 2, "host": "127.0.0.2", "port": 8081, "line_port": 11213, "state": "down"},
    ]
    body.update(extra)
    return body


class RingUpdateTests:
    """``RingUpdate.from_json``."""

    def test_reads_the_ring_and_the_addresses(self) -> None:
        """The ring, N, each node's address and state, and the leaving nodes."""
        leaving = [NodeInfo("c", "127.0.0.3", 8082, 11214, 1, NodeState.LEAVING, 5).to_dict()]
        update = RingUpdate.from_json(ring_body(leaving=leaving))
        assert update.epoch == 7 and update.replicas == 2 and set(update.ring.nodes) == {"a", "b"}
        assert update.nodes["b"] == NodeInfo("b", "127.0.0.2", 8081, 11213, 2, NodeState.DOWN)
        assert update.leaving["c"] == NodeInfo("c", "127.0.0.3", 8082, 11214, 1, NodeState.LEAVING, 5)

    def test_a_node_without_an_address_is_left_out(self) -> None:
        """A node without host or line port cannot be pushed to: it is not in ``nodes``."""
        nodes = [{"id": "a", "weight": 1, "host": "127.0.0.1"}, {"id": "b", "weight": 1, "line_port": 1}]
        update = RingUpdate.from_json(ring_body(nodes=nodes))
        assert set(update.ring.nodes) == {"a", "b"} and dict(update.nodes) == {}

    @pytest.mark.parametrize(
        "extra",
        [
            {"replicas": 0},
            {"replicas": True},
            {"replicas": "2"},
            {"leaving": {}},
            {"leaving": [{"host": "h"}]},
            {"leaving": [{"id": "c", "host": "h", "port": 1, "line_port": 2, "weight": 1, "state": "gone"}]},
            {"leaving": [{"id": "c", "host": "h", "port": "1", "line_port": 2, "weight": 1}]},
        ],
    )
    def test_a_malformed_body_is_a_value_error(self, extra: dict[str, object]) -> None:
        """A bad N or node list raises ValueError."""
        with pytest.raises(ValueError, match="malformed ring"):
            RingUpdate.from_json(ring_body(**extra))

    def test_same_placement(self) -> None:
        """Two epochs with the same members and N place alike; another N does not."""
        one = RingUpdate.from_json(ring_body())
        assert one.same_placement(RingUpdate.from_json(ring_body(epoch=9)))
        assert not one.same_placement(RingUpdate.from_json(ring_body(replicas=1)))


class SavedRingTests:
    """``save_synced`` and ``load_synced``."""

    def test_round_trip(self, tmp_path: Path) -> None:
        """The ring and N come back (not the addresses); the file is replaced whole, with no leftover."""
        path = str(tmp_path / "handoff-ring.json")
        first = RingUpdate.from_json(ring_body())
        save_synced(path, first)
        second = RingUpdate(HashRing({"a": 1}, epoch=8, points_per_node=16), 1)
        save_synced(path, second)
        loaded = load_synced(path)
        assert loaded is not None and loaded.epoch == 8 and loaded.replicas == 1
        assert loaded.same_placement(second) and dict(loaded.nodes) == {}
        assert [p.name for p in tmp_path.iterdir()] == ["handoff-ring.json"]

    def test_no_file_is_no_ring(self, tmp_path: Path) -> None:
        """A node that never saved a ring loads None."""
        assert load_synced(str(tmp_path / "missing.json")) is None

    @pytest.mark.parametrize(
        "content",
        ["{not json", "[]", '{"version": 2, "replicas": 1, "ring": {}}', '{"version": 1, "replicas": 1}'],
    )
    def test_a_file_that_is_not_a_saved_ring(self, tmp_path: Path, content: str) -> None:
        """A file that does not parse or is of another version raises ValueError."""
        path = tmp_path / "handoff-ring.json"
        path.write_text(content)
        with pytest.raises(ValueError):
            load_synced(str(path))

    def test_bad_replicas(self, tmp_path: Path) -> None:
        """A saved N that is not a positive integer raises ValueError naming the file."""
        path = tmp_path / "handoff-ring.json"
        path.write_text(json.dumps({"version": 1, "replicas": 0, "ring": HashRing({"a": 1}, epoch=1).to_dict()}))
        with pytest.raises(ValueError, match="handoff-ring.json: replicas 0"):
            load_synced(str(path))
