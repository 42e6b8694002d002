"""The ketama-compatible consistent-hash ring.

A ring is an immutable value built from the full member list (node id to integer weight) and the
epoch of the cluster map it came from. Placement follows libketama, so that any ketama client
(libmemcached, twemproxy, nginx, uhashring) computes the same primary owner from the published map:

- node ``n`` with weight ``w`` out of a total ``W`` over ``N`` nodes gets
  ``floor(points_per_node / 4 * N * w / W)`` md5 digests of ``"{n}-{i}"``;
- each digest gives 4 points, its four little-endian 32-bit words;
- a key hashes to the first little-endian 32-bit word of ``md5(key)`` and belongs to the first point at
  or after that hash, wrapping around.

When two nodes land on the same point, both points are kept, ordered by node id, so the placement does
not depend on the order nodes were added in.

This module is pure: it imports nothing of Twisted and reads no clock.
"""

from __future__ import annotations

import hashlib
import importlib
import struct
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from operator import itemgetter, methodcaller
from typing import Any

__all__ = [
    "HASH_SPACE",
    "DEFAULT_POINTS_PER_NODE",
    "Arc",
    "HashRing",
    "key_hash",
    "key_hashes",
    "moved_arcs",
]

#: Hashes are unsigned 32-bit integers: ``0 <= hash < HASH_SPACE``.
HASH_SPACE = 1 << 32

#: Points per node at equal weights, as in libketama (40 digests of 4 points each).
DEFAULT_POINTS_PER_NODE = 160

_INDEX_BITS = 20
_INDEX_MASK = (1 << _INDEX_BITS) - 1
_MAX_NODES = 1 << _INDEX_BITS
_FIRST_WORD = struct.Struct("<I").unpack_from


def _md5_function() -> Callable[[bytes], Any]:
    """CPython's own md5 (the ``_md5`` module) where the interpreter has it, else hashlib's: hashlib's goes
    through OpenSSL 3, which sets up a context for each call; measured for keys of 14 bytes, 0.21 us against
    0.45 a digest (a receiver of a handoff hashes every key it stores: bench/README.md)."""
    try:
        return importlib.import_module("_md5").md5  # type: ignore[no-any-return]
    except (ImportError, AttributeError):
        return hashlib.md5


_md5 = _md5_function()
_DIGEST = methodcaller("digest")
_FIRST_OF = itemgetter(0)


def key_hash(key: str | bytes) -> int:
    """Return the ring position of ``key``: the first little-endian 32-bit word of its md5."""
    if isinstance(key, str):
        key = key.encode("utf-8")
    return int(_FIRST_WORD(_md5(key).digest())[0])


def key_hashes(keys: Iterable[bytes]) -> list[int]:
    """``key_hash`` of each of ``keys`` (bytes), with no Python code run per key (a receiver of a bulk page
    hashes every key of it)."""
    return list(map(_FIRST_OF, map(_FIRST_WORD, map(_DIGEST, map(_md5, keys)))))


@dataclass(frozen=True, slots=True)
class Arc:
    """A range of hashes, ``start <= hash <= end`` (both inclusive), and who owns it in two rings.

    ``old`` and ``new`` are the preference lists (primary first) before and after the change.
    """

    start: int
    end: int
    old: tuple[str, ...]
    new: tuple[str, ...]

    def __contains__(self, hash_value: object) -> bool:
        return isinstance(hash_value, int) and self.start <= hash_value <= self.end

    @property
    def gained(self) -> tuple[str, ...]:
        """The nodes that entered the preference list of this arc."""
        return tuple(n for n in self.new if n not in self.old)

    @property
    def lost(self) -> tuple[str, ...]:
        """The nodes that left the preference list of this arc."""
        return tuple(n for n in self.old if n not in self.new)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {"start": self.start, "end": self.end, "old": list(self.old), "new": list(self.new)}


class HashRing:
    """An immutable ketama ring: ``HashRing({"a": 1, "b": 2}, epoch=7)``.

    Weights are positive integers. ``points_per_node`` (a multiple of 4) is the number of points a node
    gets when all weights are equal; more points give a better balance at a higher build cost.
    """

    __slots__ = (
        "_weights",
        "_epoch",
        "_points_per_node",
        "_points",
        "_owners",
        "_count",
        "_prefs",
    )

    _weights: dict[str, int]
    _epoch: int
    _points_per_node: int
    _points: list[int]
    _owners: list[str]
    _count: int
    _prefs: dict[int, tuple[str, ...]]

    def __init__(
        self,
        weights: Mapping[str, int] | Iterable[str] = (),
        epoch: int = 0,
        points_per_node: int = DEFAULT_POINTS_PER_NODE,
    ) -> None:
        if not isinstance(weights, Mapping):
            weights = {node: 1 for node in weights}
        if points_per_node <= 0 or points_per_node % 4:
            raise ValueError(f"points_per_node must be a positive multiple of 4, not {points_per_node!r}")
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, not {epoch!r}")
        clean: dict[str, int] = {}
        for node, weight in weights.items():
            if not isinstance(node, str) or not node:
                raise ValueError(f"node ids must be non-empty strings, not {node!r}")
            if isinstance(weight, bool) or not isinstance(weight, int) or weight <= 0:
                raise ValueError(f"weight of node {node!r} must be a positive integer, not {weight!r}")
            clean[node] = weight
        if len(clean) > _MAX_NODES:
            raise ValueError(f"a ring holds at most {_MAX_NODES} nodes")
        object.__setattr__(self, "_weights", dict(sorted(clean.items())))
        object.__setattr__(self, "_epoch", epoch)
        object.__setattr__(self, "_points_per_node", points_per_node)
        pairs = self._build_points()
        object.__setattr__(self, "_points", [p for p, _ in pairs])
        object.__setattr__(self, "_owners", [n for _, n in pairs])
        object.__setattr__(self, "_count", len(pairs))
        # Memo of preference lists by point index. Filling it from several threads is harmless:
        # every thread computes the same tuple for the same index.
        object.__setattr__(self, "_prefs", {})

    def _build_points(self) -> list[tuple[int, str]]:
        total = sum(self._weights.values())
        names = list(self._weights)
        digests_per_node = self._points_per_node // 4
        # Sorting plain ints is much faster than sorting tuples: pack (point, node index) into one
        # int. Node indexes follow the sorted ids, which orders colliding points by node id.
        packed: list[int] = []
        for index, node in enumerate(names):
            digests = (digests_per_node * len(names) * self._weights[node]) // total
            prefix = (node + "-").encode()
            blob = b"".join([_md5(prefix + str(i).encode()).digest() for i in range(digests)])
            packed.extend([(word << _INDEX_BITS) | index for word in struct.unpack(f"<{4 * digests}I", blob)])
        packed.sort()
        return [(p >> _INDEX_BITS, names[p & _INDEX_MASK]) for p in packed]

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("HashRing is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        return (HashRing, (self._weights, self._epoch, self._points_per_node))

    # -- identity ---------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The epoch of the cluster map this ring was built from."""
        return self._epoch

    @property
    def points_per_node(self) -> int:
        """Points a node gets at equal weights."""
        return self._points_per_node

    @property
    def weights(self) -> dict[str, int]:
        """A copy of the member list: node id to weight."""
        return dict(self._weights)

    @property
    def nodes(self) -> tuple[str, ...]:
        """The node ids, sorted."""
        return tuple(self._weights)

    def __len__(self) -> int:
        return len(self._weights)

    def __contains__(self, node: object) -> bool:
        return node in self._weights

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HashRing):
            return NotImplemented
        return (self._weights, self._epoch, self._points_per_node) == (
            other._weights,
            other._epoch,
            other._points_per_node,
        )

    def __hash__(self) -> int:
        return hash((tuple(self._weights.items()), self._epoch, self._points_per_node))

    def __repr__(self) -> str:
        return f"HashRing({self._weights!r}, epoch={self._epoch})"

    def same_placement(self, other: HashRing) -> bool:
        """True when both rings place every key the same way (the epoch aside)."""
        return self._weights == other._weights and self._points_per_node == other._points_per_node

    # -- placement --------------------------------------------------------------------------------

    def node_for(self, key: str | bytes) -> str:
        """The primary owner of ``key``. Raises ``LookupError`` on an empty ring."""
        if isinstance(key, str):
            key = key.encode("utf-8")
        index = bisect_left(self._points, _FIRST_WORD(_md5(key).digest())[0])
        try:
            return self._owners[index]
        except IndexError:
            if not self._count:
                raise LookupError("the ring has no nodes") from None
            return self._owners[0]

    def node_for_hash(self, hash_value: int) -> str:
        """The primary owner of a ring position."""
        if not self._count:
            raise LookupError("the ring has no nodes")
        index = bisect_left(self._points, hash_value)
        return self._owners[index if index < self._count else 0]

    def preference_list(self, key: str | bytes, n: int) -> tuple[str, ...]:
        """The first ``n`` distinct nodes clockwise from ``key``, primary first.

        With ``n`` larger than the number of nodes, every node is returned.
        """
        if isinstance(key, str):
            key = key.encode("utf-8")
        index = bisect_left(self._points, _FIRST_WORD(_md5(key).digest())[0])
        if index == self._count:
            index = 0
        prefs = self._prefs.get(index)
        if prefs is None or (len(prefs) < n and len(prefs) < len(self._weights)):
            prefs = self._walk(index, n)
        return prefs[:n] if len(prefs) > n else prefs

    def preference_list_for_hash(self, hash_value: int, n: int) -> tuple[str, ...]:
        """The preference list of a ring position (see ``preference_list``)."""
        if not self._count:
            return ()
        index = bisect_left(self._points, hash_value)
        if index == self._count:
            index = 0
        prefs = self._prefs.get(index)
        if prefs is None or (len(prefs) < n and len(prefs) < len(self._weights)):
            prefs = self._walk(index, n)
        return prefs[:n] if len(prefs) > n else prefs

    def _walk(self, index: int, n: int) -> tuple[str, ...]:
        """Collect up to ``n`` distinct owners clockwise from point ``index`` and memoize them."""
        wanted = min(n, len(self._weights))
        found: list[str] = []
        owners = self._owners
        count = self._count
        i = index
        for _ in range(count):
            owner = owners[i]
            if owner not in found:
                found.append(owner)
                if len(found) == wanted:
                    break
            i += 1
            if i == count:
                i = 0
        prefs = tuple(found)
        self._prefs[index] = prefs
        return prefs

    def shares(self) -> dict[str, float]:
        """Each node's share of the hash space (primary ownership), summing to 1."""
        result = dict.fromkeys(self._weights, 0.0)
        if not self._count:
            return result
        previous = self._points[-1] - HASH_SPACE
        for point, owner in zip(self._points, self._owners):
            result[owner] += (point - previous) / HASH_SPACE
            previous = point
        return result

    def points(self) -> list[tuple[int, str]]:
        """The continuum as sorted ``(point, node)`` pairs, as ketama clients list it."""
        return list(zip(self._points, self._owners))

    # -- JSON form --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: enough for a client in any language to rebuild the same ring."""
        return {
            "algorithm": "ketama-md5",
            "epoch": self._epoch,
            "points_per_node": self._points_per_node,
            "nodes": [{"id": node, "weight": weight} for node, weight in self._weights.items()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HashRing:
        """Rebuild a ring from ``to_dict()``'s form. Raises ``ValueError`` on a malformed one."""
        try:
            algorithm = data.get("algorithm", "ketama-md5")
            if algorithm != "ketama-md5":
                raise ValueError(f"unknown ring algorithm {algorithm!r}")
            nodes = {str(item["id"]): item["weight"] for item in data["nodes"]}
            return cls(
                nodes,
                epoch=data.get("epoch", 0),
                points_per_node=data.get("points_per_node", DEFAULT_POINTS_PER_NODE),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed ring: {e!r}") from e


def moved_arcs(old: HashRing, new: HashRing, n: int) -> list[Arc]:
    """The hash ranges whose preference list of length ``n`` differs between ``old`` and ``new``.

    Between two consecutive points of the union of both rings' continua, each ring's preference list
    is constant, so the answer is exact. Adjacent ranges with the same change are merged, and the
    range that wraps around the top of the hash space is split at it, so every arc has
    ``start <= end``.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, not {n!r}")
    cuts = sorted(set(old._points).union(new._points))
    if not cuts:
        return []
    arcs: list[Arc] = []

    def add(start: int, end: int, was: tuple[str, ...], now: tuple[str, ...]) -> None:
        if was == now:
            return
        last = arcs[-1] if arcs else None
        if last is not None and last.end + 1 == start and last.old == was and last.new == now:
            arcs[-1] = Arc(last.start, end, was, now)
        else:
            arcs.append(Arc(start, end, was, now))

    start = 0
    for cut in cuts:
        add(start, cut, old.preference_list_for_hash(cut, n), new.preference_list_for_hash(cut, n))
        start = cut + 1
    if start < HASH_SPACE:
        # Keys above the last cut wrap to the first point of each ring: same lists as hash 0.
        add(start, HASH_SPACE - 1, old.preference_list_for_hash(0, n), new.preference_list_for_hash(0, n))
    return arcs
