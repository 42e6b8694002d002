"""The ketama ring: placement, movement, arcs, JSON form."""

from __future__ import annotations

import hashlib
import importlib
import pickle
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from uhashring import HashRing as UHashRing

from chashd import ring as ring_module
from chashd.ring import HASH_SPACE, HashRing, key_hash, moved_arcs

KEYS = [f"user:{i}:{random.Random(i).random()}" for i in range(12_000)]

NODE_SETS = [
    {"a": 1, "b": 1, "c": 1},
    {"cache-1": 1, "cache-2": 2, "cache-3": 3, "cache-4": 5},
    {f"10.0.0.{i}:11211": w for i, w in enumerate([1, 3, 1, 7, 2, 2, 9, 1, 4, 1])},
    {"kvstore-A": 100, "kvstore-B": 150, "kvstore-C": 50, "kvstore-D": 100, "kvstore-E": 300},
]

node_ids = st.text(alphabet="abcdefghij0123456789-", min_size=1, max_size=8)
member_maps = st.dictionaries(node_ids, st.integers(1, 5), min_size=1, max_size=6)


class PlacementTests:
    """Placement equals the ketama reference (uhashring's ketama mode)."""

    @pytest.mark.parametrize("nodes", NODE_SETS, ids=lambda n: f"{len(n)}-nodes")
    def test_matches_uhashring(self, nodes: dict[str, int]) -> None:
        """Every key lands on the node uhashring's ketama mode picks."""
        ours = HashRing(nodes)
        theirs = UHashRing({n: {"weight": w} for n, w in nodes.items()}, hash_fn="ketama")
        mismatches = [k for k in KEYS if ours.node_for(k) != theirs.get_node(k)]
        assert mismatches == []

    def test_continuum_matches_uhashring(self) -> None:
        """The points themselves are libketama's: same count and positions per node."""
        nodes = NODE_SETS[1]
        ours = HashRing(nodes).points()
        theirs = UHashRing({n: {"weight": w} for n, w in nodes.items()}, hash_fn="ketama").get_points()
        assert ours == sorted(theirs)

    def test_points_per_weight(self) -> None:
        """At equal weights each node has points_per_node points."""
        ring = HashRing({"a": 1, "b": 1}, points_per_node=640)
        owners = [node for _, node in ring.points()]
        assert owners.count("a") == owners.count("b") == 640

    def test_str_and_bytes_keys_agree(self) -> None:
        """A str key and its UTF-8 bytes have the same owner and hash."""
        ring = HashRing(NODE_SETS[1])
        for key in KEYS[:500] + ["clé-ünïcode"]:
            assert ring.node_for(key) == ring.node_for(key.encode())
            assert key_hash(key) == key_hash(key.encode())

    def test_key_hash_is_md5s_first_word(self) -> None:
        """The md5 the ring uses (CPython's own where it has one) gives hashlib's digest: the hash is the first
        little-endian word of it; without ``_md5`` the ring takes hashlib's."""
        for key in [b"", b"a", b"bench-00000001", b"x" * 250, "clé".encode()]:
            assert key_hash(key) == int.from_bytes(hashlib.md5(key).digest()[:4], "little")

        def no_module(name: str) -> object:
            raise ImportError(name)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(importlib, "import_module", no_module)
            assert ring_module._md5_function() is hashlib.md5

    def test_order_independent(self) -> None:
        """Two rings with the same members given in different orders route every key the same."""
        items = list(NODE_SETS[2].items())
        one = HashRing(dict(items))
        other = HashRing(dict(reversed(items)))
        assert all(one.node_for(k) == other.node_for(k) for k in KEYS[:2000])

    def test_node_for_hash_is_node_for(self) -> None:
        """Placing a key or its hash gives the same node."""
        ring = HashRing(NODE_SETS[0])
        for key in KEYS[:500]:
            assert ring.node_for_hash(key_hash(key)) == ring.node_for(key)

    def test_wraps_around(self) -> None:
        """A hash above the last point belongs to the first point's node."""
        ring = HashRing({"a": 1, "b": 1})
        points = ring.points()
        assert ring.node_for_hash(HASH_SPACE - 1) == points[0][1]
        assert ring.node_for_hash(points[-1][0] + 1) == points[0][1]
        assert ring.node_for_hash(points[3][0]) == points[3][1]

    def test_empty_ring(self) -> None:
        """An empty ring has no owner for any key and no preference list."""
        ring = HashRing({})
        with pytest.raises(LookupError):
            ring.node_for("k")
        assert ring.preference_list("k", 3) == ()

    def test_bad_members(self) -> None:
        """Weights must be positive integers and ids non-empty strings."""
        for bad in ({"a": 0}, {"a": -1}, {"a": 1.5}, {"": 1}, {"a": True}):
            with pytest.raises(ValueError):
                HashRing(bad)
        with pytest.raises(ValueError):
            HashRing({"a": 1}, points_per_node=10)


class PreferenceListTests:
    """preference_list(key, n): distinct nodes, primary first."""

    def test_distinct_primary_first(self) -> None:
        """The list starts with node_for and holds distinct nodes."""
        ring = HashRing(NODE_SETS[2])
        for key in KEYS[:3000]:
            prefs = ring.preference_list(key, 3)
            assert len(prefs) == 3 == len(set(prefs))
            assert prefs[0] == ring.node_for(key)

    def test_longer_list_extends_shorter(self) -> None:
        """The list for n+1 is the list for n plus one node, whatever was asked first."""
        ring = HashRing(NODE_SETS[2])
        for key in KEYS[:500]:
            five = ring.preference_list(key, 5)
            assert ring.preference_list(key, 2) == five[:2]
            assert ring.preference_list(key, 7)[:5] == five

    def test_n_larger_than_nodes(self) -> None:
        """Asking for more nodes than the ring has returns every node once."""
        ring = HashRing(NODE_SETS[0])
        prefs = ring.preference_list("k", 10)
        assert sorted(prefs) == ["a", "b", "c"]

    def test_walk_is_clockwise(self) -> None:
        """The list is the distinct owners of the points from the key's point on, in order."""
        ring = HashRing(NODE_SETS[1])
        points = ring.points()
        for key in KEYS[:200]:
            h = key_hash(key)
            start = next((i for i, (p, _) in enumerate(points) if p >= h), 0)
            walk: list[str] = []
            for _, node in points[start:] + points[:start]:
                if node not in walk:
                    walk.append(node)
            assert list(ring.preference_list(key, 4)) == walk


class MovementTests:
    """Consistent hashing moves only what it must.

    With equal weights every node keeps exactly its points whatever the member count, so keys move
    only to a new node or away from a removed one. With unequal weights, ketama recomputes each
    node's point count from the total, so a few keys also move between old nodes: the price of
    placing keys exactly as every ketama client does.
    """

    @settings(max_examples=40, deadline=None)
    @given(st.sets(node_ids, min_size=1, max_size=6), node_ids, st.integers(1, 5))
    def test_adding_moves_only_to_new_node(self, members: set[str], new: str, weight: int) -> None:
        """At equal weights, after adding a node every key either stays or moves to the new node."""
        if new in members:
            return
        old = HashRing({m: weight for m in members})
        grown = HashRing({**{m: weight for m in members}, new: weight})
        for key in KEYS[:1500]:
            after = grown.node_for(key)
            assert after == old.node_for(key) or after == new

    @settings(max_examples=40, deadline=None)
    @given(st.sets(node_ids, min_size=2, max_size=6))
    def test_removing_moves_only_removed_keys(self, members: set[str]) -> None:
        """At equal weights, after removing a node only the keys it owned change owner."""
        gone = sorted(members)[0]
        old = HashRing(members)
        shrunk = HashRing(members - {gone})
        for key in KEYS[:1500]:
            before = old.node_for(key)
            if before != gone:
                assert shrunk.node_for(key) == before

    def test_movement_near_ideal(self) -> None:
        """Adding an 11th node to 10 moves about 1/11 of the keys."""
        old = HashRing({f"n{i}": 1 for i in range(10)})
        new = HashRing({f"n{i}": 1 for i in range(11)})
        moved = sum(old.node_for(k) != new.node_for(k) for k in KEYS)
        assert 0.5 / 11 < moved / len(KEYS) < 1.5 / 11


class MovedArcsTests:
    """moved_arcs(old, new, n) is exact."""

    @settings(max_examples=60, deadline=None)
    @given(member_maps, member_maps, st.integers(1, 4))
    def test_agrees_with_brute_force(self, before: dict[str, int], after: dict[str, int], n: int) -> None:
        """A key is in a moved arc exactly when its preference list changed, with those lists."""
        old, new = HashRing(before), HashRing(after)
        arcs = moved_arcs(old, new, n)
        starts = [a.start for a in arcs]
        assert starts == sorted(starts)
        for a, b in zip(arcs, arcs[1:]):
            assert a.end < b.start
        for key in KEYS[:800]:
            h = key_hash(key)
            was, now = old.preference_list(key, n), new.preference_list(key, n)
            inside = [a for a in arcs if h in a]
            if was == now:
                assert inside == []
            else:
                assert len(inside) == 1
                assert (inside[0].old, inside[0].new) == (was, now)

    def test_boundaries_exact(self) -> None:
        """Arc edges fall on points: the hash at each edge is classified like a key would be."""
        old = HashRing({"a": 1, "b": 1, "c": 1})
        new = HashRing({"a": 1, "b": 1, "c": 1, "d": 1})
        for arc in moved_arcs(old, new, 2):
            for h in (arc.start, arc.end):
                assert old.preference_list_for_hash(h, 2) == arc.old
                assert new.preference_list_for_hash(h, 2) == arc.new
            assert "d" in arc.gained

    def test_same_ring_moves_nothing(self) -> None:
        """Identical member lists give no arcs, whatever the epochs."""
        assert moved_arcs(HashRing(NODE_SETS[1], epoch=1), HashRing(NODE_SETS[1], epoch=2), 3) == []

    def test_from_empty(self) -> None:
        """From an empty ring, the whole hash space moves."""
        arcs = moved_arcs(HashRing({}), HashRing({"a": 1}), 1)
        assert sum(a.end - a.start + 1 for a in arcs) == HASH_SPACE


class ValueTests:
    """A ring is an immutable value with a JSON form."""

    def test_json_round_trip(self) -> None:
        """from_dict(to_dict()) rebuilds an equal ring that places keys the same."""
        ring = HashRing(NODE_SETS[3], epoch=42, points_per_node=320)
        data = ring.to_dict()
        assert data["epoch"] == 42 and data["algorithm"] == "ketama-md5"
        again = HashRing.from_dict(data)
        assert again == ring
        assert all(again.node_for(k) == ring.node_for(k) for k in KEYS[:500])

    def test_from_dict_rejects_malformed(self) -> None:
        """A malformed JSON form raises ValueError."""
        for bad in (
            {},
            {"nodes": [{"weight": 1}]},
            {"nodes": [{"id": "a", "weight": 0}]},
            {"algorithm": "x", "nodes": []},
        ):
            with pytest.raises(ValueError):
                HashRing.from_dict(bad)

    def test_immutable(self) -> None:
        """Attributes cannot be set and the weights view is a copy."""
        ring = HashRing({"a": 1})
        with pytest.raises(AttributeError):
            ring._epoch = 3
        ring.weights["b"] = 1
        assert ring.nodes == ("a",)

    def test_pickles(self) -> None:
        """A ring survives pickling (it crosses threads and processes)."""
        ring = HashRing(NODE_SETS[1], epoch=5)
        assert pickle.loads(pickle.dumps(ring)) == ring

    def test_shares(self) -> None:
        """Shares sum to 1 and follow the weights."""
        shares = HashRing({"a": 1, "b": 3}, points_per_node=1024).shares()
        assert abs(sum(shares.values()) - 1) < 1e-9
        assert 0.2 < shares["a"] < 0.3
