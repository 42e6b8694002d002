"""Range digests for anti-entropy (chashd.digests): pure functions, checked by hand and by properties."""

from __future__ import annotations

import random
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chashd.digests import MAX_HASH, RangeDigest, compare_versions, digest_parts, fingerprint, split_range
from chashd.ring import key_hash
from chashd.versions import Version


def entries_of(records: dict[bytes, Version]) -> list[tuple[int, bytes, Version]]:
    """``(hash, key, version)`` in (hash, key) order, as an engine's scan_versions gives them."""
    return sorted((key_hash(key), key, version) for key, version in records.items())


def digest_of(records: dict[bytes, Version], first: int = 0, last: int = MAX_HASH) -> RangeDigest:
    """The digest of the whole range ``[first, last]``."""
    return digest_parts(entries_of(records), first, last, 1)[0]


class FingerprintTests:
    """A record's fingerprint depends on its key and its whole version, and on nothing else."""

    def test_fixed_values(self) -> None:
        """The fingerprint is CRC-32 based and the same in every process (a wire value between nodes)."""
        assert fingerprint(b"k", Version(1 << 16, "gw-1")) == fingerprint(b"k", Version(1 << 16, "gw-1"))
        assert 0 <= fingerprint(b"k", Version(5)) < 2**32
        # The definition, a wire value: CRC-32 over the key, then the clock (8 bytes, little-endian), then the writer.
        expected = zlib.crc32(b"gateway-1", zlib.crc32((123456789).to_bytes(8, "little"), zlib.crc32(b"key")))
        assert fingerprint(b"key", Version(123456789, "gateway-1")) == expected

    def test_each_part_counts(self) -> None:
        """Another key, clock or writer gives another fingerprint."""
        base = fingerprint(b"k", Version(100, "a"))
        assert base != fingerprint(b"j", Version(100, "a"))
        assert base != fingerprint(b"k", Version(101, "a"))
        assert base != fingerprint(b"k", Version(100, "b"))


class SplitRangeTests:
    """split_range cuts a range into consecutive pieces of nearly equal width."""

    def test_covers_the_range(self) -> None:
        """The pieces start at first, end at last, follow each other, and differ by at most one in width."""
        for first, last, parts in [(0, MAX_HASH, 16), (10, 20, 3), (5, 5, 16), (0, 99, 100), (7, 1000, 7)]:
            pieces = split_range(first, last, parts)
            assert pieces[0][0] == first and pieces[-1][1] == last
            assert all(a[1] + 1 == b[0] for a, b in zip(pieces, pieces[1:]))
            widths = {end - start + 1 for start, end in pieces}
            assert max(widths) - min(widths) <= 1
            assert len(pieces) == min(parts, last - first + 1)

    def test_empty_range(self) -> None:
        """A range that ends before it starts is an error."""
        with pytest.raises(ValueError):
            split_range(5, 4, 2)


class DigestPartsTests:
    """One pass over a range gives each piece's digest, as digesting each piece alone would."""

    @settings(max_examples=50, deadline=None)
    @given(
        keys=st.sets(st.binary(min_size=1, max_size=8), max_size=80),
        bounds=st.tuples(st.integers(0, MAX_HASH), st.integers(0, MAX_HASH)).map(sorted),
        parts=st.integers(1, 40),
    )
    def test_parts_agree_with_each_piece(self, keys: set[bytes], bounds: list[int], parts: int) -> None:
        """The digest of each piece equals the digest of that piece's own records; they sum to the whole."""
        first, last = bounds
        records = {key: Version(i + 1, "w") for i, key in enumerate(sorted(keys))}
        digests = digest_parts(entries_of(records), first, last, parts)
        pieces = split_range(first, last, parts)
        assert len(digests) == len(pieces)
        whole = RangeDigest()
        for (start, end), digest in zip(pieces, digests):
            inside = {k: v for k, v in records.items() if start <= key_hash(k) <= end}
            assert digest.records == len(inside)
            assert digest.total == sum(fingerprint(k, v) for k, v in inside.items()) % 2**64
            whole = whole.add(digest)
        assert whole == digest_of(records, first, last)

    def test_order_does_not_matter(self) -> None:
        """The digest of a range is the same whatever order its records come in (pages, engines)."""
        records = {b"k%d" % i: Version(i, "g") for i in range(100)}
        entries = entries_of(records)
        shuffled = list(entries)
        random.Random(4).shuffle(shuffled)
        assert digest_parts(entries, 0, MAX_HASH, 8) == digest_parts(shuffled, 0, MAX_HASH, 8)

    def test_differences_show(self) -> None:
        """A missing key, an older version or a tombstone's new version changes the digest of its range."""
        records = {b"k%d" % i: Version(1000 + i, "g") for i in range(50)}
        same = dict(records)
        assert digest_of(records) == digest_of(same)
        missing = dict(records)
        del missing[b"k7"]
        older = dict(records)
        older[b"k7"] = Version(5, "g")
        assert digest_of(missing) != digest_of(records)
        assert digest_of(older) != digest_of(records)
        assert digest_of(older).records == digest_of(records).records


class CompareVersionsTests:
    """What two replicas' key lists tell them to push and pull."""

    def test_push_and_pull(self) -> None:
        """Push what the other lacks or holds older; pull what it holds newer or this side lacks."""
        mine = [(b"a", Version(5)), (b"b", Version(9)), (b"c", Version(3)), (b"e", Version(1))]
        theirs = [(b"a", Version(5)), (b"b", Version(7)), (b"c", Version(4)), (b"d", Version(1))]
        assert compare_versions(mine, theirs) == ([b"b", b"e"], [b"c", b"d"])
        assert compare_versions(theirs, mine) == ([b"c", b"d"], [b"b", b"e"])
        assert compare_versions(mine, mine) == ([], [])
