"""What a kvstore hands off when the ring's placement changes: the plan of a handoff. Pure: no I/O, no clock.

``plan(node_id, old, new)`` lists the arcs of ``moved_arcs(old.ring, new.ring, n)`` (n the larger N of the
two rings) that concern this node, each as an ``ArcWork``:

- only arcs this node held: it is in the arc's old preference list, or ``old`` is the empty ring of a node
  that has data but no saved ring (then every arc counts: its records go to every replica of the new ring);
- ``targets``: the nodes that entered the arc's list (``arc.gained``), this node excepted;
- ``drop``: this node is not in the arc's new list, which is not empty: once the targets acknowledged a
  record, this node forgets it. Records of an arc whose new list is empty (the last node leaves) are kept:
  there is nowhere to push them.

An arc with no target and nothing to drop is left out. ``Plan.owned`` is the width of the hash space this
node owned under ``old`` (the whole space for an empty ``old``), from which ``Plan.estimates(keys)`` spreads
the node's records evenly over the arcs to estimate what each one holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from chashd.kvstore.placement import RingUpdate
from chashd.ring import HASH_SPACE, Arc, HashRing, moved_arcs

__all__ = ["ArcWork", "Plan", "plan"]


@dataclass(frozen=True)
class ArcWork:
    """One arc to hand off: where to push it and whether this node drops it afterwards."""

    arc: Arc
    targets: tuple[str, ...]
    drop: bool

    @property
    def width(self) -> int:
        """The number of hash values in the arc."""
        return self.arc.end - self.arc.start + 1


@dataclass(frozen=True)
class Plan:
    """The arcs a node hands off to go from ``old`` to ``new``, in ring order."""

    old: RingUpdate
    new: RingUpdate
    work: tuple[ArcWork, ...]
    #: The width of the hash space the node owned under ``old`` (at least 1).
    owned: int

    def estimates(self, keys: int) -> list[tuple[float, int]]:
        """For each arc, ``(records, targets)``: the records it holds if the node's ``keys`` records are
        spread evenly over the hash space it owned, and the number of nodes to push them to."""
        return [(keys * w.width / self.owned, len(w.targets)) for w in self.work]


def plan(node_id: str, old: RingUpdate, new: RingUpdate) -> Plan:
    """The plan of ``node_id``'s handoff from ``old`` to ``new`` (see the module docstring)."""
    n = max(old.replicas, new.replicas)
    empty = len(old.ring) == 0
    work = []
    for arc in moved_arcs(old.ring, new.ring, n):
        if not empty and node_id not in arc.old:
            continue  # this node held nothing there
        targets = tuple(t for t in arc.gained if t != node_id)
        drop = node_id not in arc.new and bool(arc.new)
        if targets or drop:
            work.append(ArcWork(arc, targets, drop))
    if empty:
        owned = HASH_SPACE
    else:
        nobody = HashRing({}, epoch=0, points_per_node=old.ring.points_per_node)
        owned = sum(a.end - a.start + 1 for a in moved_arcs(nobody, old.ring, old.replicas) if node_id in a.new)
    return Plan(old, new, tuple(work), max(1, owned))
