"""The plan of a handoff (chashd.kvstore.plan): which arcs a node pushes, to whom, and which it drops."""

from __future__ import annotations

from chashd.kvstore.placement import RingUpdate
from chashd.kvstore.plan import plan
from chashd.ring import HASH_SPACE, HashRing, key_hash, moved_arcs

POINTS = 16


def ring(epoch: int, *node_ids: str, replicas: int = 1) -> RingUpdate:
    """A ring of ``node_ids`` at equal weights."""
    return RingUpdate(HashRing(dict.fromkeys(node_ids, 1), epoch=epoch, points_per_node=POINTS), replicas)


def owner_share(update: RingUpdate, node_id: str) -> int:
    """The width of the hash space whose preference list holds ``node_id``."""
    arcs = moved_arcs(ring(0).ring, update.ring, update.replicas)  # from the empty ring: every arc
    return sum(a.end - a.start + 1 for a in arcs if node_id in a.new)


class PlanTests:
    """``plan(node_id, old, new)``."""

    def test_a_join_moves_the_new_nodes_share_to_it(self) -> None:
        """With N=1, the only node pushes to the joining one exactly the arcs it now owns, and drops them;
        the joining node, which held nothing, has nothing to do."""
        one, two = ring(1, "A"), ring(2, "A", "B")
        planned = plan("A", one, two)
        assert planned.work and all(w.targets == ("B",) and w.drop for w in planned.work)
        assert sum(w.width for w in planned.work) == owner_share(two, "B")
        assert planned.owned == HASH_SPACE and planned.old is one and planned.new is two
        assert plan("B", one, two).work == ()
        for key in (b"k-%d" % i for i in range(200)):
            moving = any(key_hash(key) in w.arc for w in planned.work)
            assert moving == (two.ring.node_for(key) == "B")

    def test_a_replica_that_stays_keeps_its_copy(self) -> None:
        """With N=2, a node still in an arc's new list pushes to the node that entered it and keeps the arc;
        a node pushed out of the list drops it."""
        old, new = ring(1, "A", "B", replicas=2), ring(2, "A", "B", "C", replicas=2)
        for node_id in ("A", "B"):
            work = plan(node_id, old, new).work
            assert work and all(w.targets == ("C",) for w in work)
            for w in work:
                assert w.drop == (node_id not in w.arc.new)
        moved = moved_arcs(old.ring, new.ring, 2)  # C took one of the two places of each: one node drops it
        dropped = [w for node_id in ("A", "B") for w in plan(node_id, old, new).work if w.drop]
        assert sorted(w.arc.start for w in dropped) == [a.start for a in moved]

    def test_no_saved_ring_pushes_everything_to_every_replica(self) -> None:
        """From the empty ring (a node with data but no saved ring), every arc counts: the node pushes to each
        of its replicas but itself, and drops what it does not own."""
        new = ring(5, "A", "B", "C", replicas=2)
        planned = plan("A", ring(0), new)
        assert sum(w.width for w in planned.work) == HASH_SPACE
        for w in planned.work:
            assert set(w.targets) == set(w.arc.new) - {"A"}
            assert w.drop == ("A" not in w.arc.new)
        assert planned.owned == HASH_SPACE

    def test_the_last_node_keeps_its_data(self) -> None:
        """When the new ring is empty there is nowhere to push: nothing to do, nothing dropped."""
        assert plan("A", ring(1, "A"), ring(2)).work == ()

    def test_estimates_spread_the_records_over_what_the_node_owned(self) -> None:
        """Each arc's estimate is the node's records times the arc's share of the hash space it owned, with
        the number of targets; the estimates of a node that gives half of its space away add up to about half
        its records."""
        old, new = ring(1, "A", "B"), ring(2, "A", "B", "C")
        planned = plan("A", old, new)
        assert planned.owned == owner_share(old, "A")
        estimates = planned.estimates(1000)
        assert [targets for _, targets in estimates] == [len(w.targets) for w in planned.work]
        moved = sum(w.width for w in planned.work)
        assert abs(sum(records for records, _ in estimates) - 1000 * moved / planned.owned) < 1e-6
        assert 0 < sum(records for records, _ in estimates) < 1000
