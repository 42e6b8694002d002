"""Digests of key ranges, for anti-entropy: replicas compare digests, then only the keys that differ.

A record's *fingerprint* is a 32-bit CRC of its key and its version, so two replicas holding the same
version of a key give the same fingerprint, and any other version (or a missing key) almost always another
one. A range's digest is ``(records, total)``: how many records it holds and the sum of their fingerprints
modulo 2**64. The sum does not depend on the order, so one pass over a range in hash order gives the
digest of each of its ``parts`` equal sub-ranges (``digest_parts``), and a range's digest is the sum of its
parts'. Two replicas with the same records give equal digests; a difference shows in the digest of every
range that holds it, which is what the recursive comparison follows down to short lists of
``(key, version)`` (``compare_versions``).

Pure: no Twisted, no clock, no I/O.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from chashd.versions import Version

__all__ = [
    "MAX_HASH",
    "MAX_PARTS",
    "RangeDigest",
    "compare_versions",
    "digest_parts",
    "fingerprint",
    "split_range",
]

_MASK = (1 << 64) - 1
#: The largest ring hash (hashes are 32 bits).
MAX_HASH = (1 << 32) - 1
#: Sub-ranges one digest request may ask for.
MAX_PARTS = 256


class RangeDigest(NamedTuple):
    """The digest of the records of a hash range: their number, and the sum of their fingerprints."""

    records: int = 0
    total: int = 0

    def add(self, other: RangeDigest) -> RangeDigest:
        """The digest of both ranges' records together."""
        return RangeDigest(self.records + other.records, (self.total + other.total) & _MASK)


def fingerprint(key: bytes, version: Version) -> int:
    """A 32-bit fingerprint of ``key`` at ``version``: the CRC-32 of the key, the clock and the writer."""
    return zlib.crc32(
        version.writer.encode("utf-8", "surrogateescape"),
        zlib.crc32(version.clock.to_bytes(8, "little"), zlib.crc32(key)),
    )


def split_range(first: int, last: int, parts: int) -> list[tuple[int, int]]:
    """``[first, last]`` cut into at most ``parts`` consecutive sub-ranges of (nearly) equal width, each
    ``(first, last)`` inclusive; fewer when the range holds fewer hash values than ``parts``."""
    if last < first:
        raise ValueError(f"empty range {first}-{last}")
    width = last - first + 1
    parts = max(1, min(parts, width))
    bounds = [first + width * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(parts)]


def digest_parts(entries: Iterable[tuple[int, bytes, Version]], first: int, last: int, parts: int) -> list[RangeDigest]:
    """The digest of each sub-range of ``split_range(first, last, parts)`` from ``(hash, key, version)``
    entries (those outside ``[first, last]`` are ignored), in one pass."""
    ranges = split_range(first, last, parts)
    width = last - first + 1
    count = len(ranges)
    counts = [0] * count
    totals = [0] * count
    for hash_value, key, version in entries:
        if first <= hash_value <= last:
            index = (hash_value - first) * count // width
            # split_range's bounds are floor(width * i / count): the index above may be one too far.
            while index and hash_value < ranges[index][0]:
                index -= 1
            while index + 1 < count and hash_value > ranges[index][1]:
                index += 1
            counts[index] += 1
            totals[index] += fingerprint(key, version)
    return [RangeDigest(c, t & _MASK) for c, t in zip(counts, totals)]


def compare_versions(
    mine: Sequence[tuple[bytes, Version]], theirs: Sequence[tuple[bytes, Version]]
) -> tuple[list[bytes], list[bytes]]:
    """What two replicas' ``(key, version)`` lists of one range tell them to exchange: the keys to push (this
    side holds a newer version, or the other lacks the key) and the keys to pull (the other way round), in
    the lists' order."""
    their_versions = dict(theirs)
    my_versions = dict(mine)
    push = [key for key, version in mine if (other := their_versions.get(key)) is None or version > other]
    pull = [key for key, version in theirs if (own := my_versions.get(key)) is None or version > own]
    return push, pull
