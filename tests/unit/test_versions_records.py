"""Versions order writes; records merge by version; memcached's expiry rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chashd.errors import BadKey
from chashd.record import (
    RELATIVE_EXPIRY_LIMIT,
    Record,
    check_key,
    expires_at_from_exptime,
    purgeable,
    resolve,
)
from chashd.versions import MAX_CLOCK, ZERO, HybridClock, Version, parse_version

versions = st.builds(Version, st.integers(0, 2**63 - 1), st.text("abc-", max_size=3))
records = st.builds(
    Record, st.binary(max_size=4), st.integers(0, 2**32 - 1), st.integers(0, 10), versions, st.booleans()
)


class VersionTests:
    """Version ordering and text form."""

    @given(versions, versions, versions)
    def test_total_order(self, a: Version, b: Version, c: Version) -> None:
        """Ordering is total and transitive; equal versions are the same write."""
        assert (a < b) + (a == b) + (a > b) == 1
        if a <= b <= c:
            assert a <= c

    @given(versions)
    def test_text_round_trip(self, v: Version) -> None:
        """str() and parse() are inverse, writer ids with dashes included."""
        assert Version.parse(str(Version(v.clock, "gw-1" + v.writer))) == Version(v.clock, "gw-1" + v.writer)

    @pytest.mark.parametrize(
        "bad",
        ["", "x-1", "-a", "1.5-a", str(2**64) + "-a", str(2**64 - 1) + "-x", str(2**63), "1-a b", "1-" + "w" * 65,
         "1--a", "1-\x00", "٣-a", "0" * 4000],
    )  # fmt: skip
    def test_parse_rejects(self, bad: str) -> None:
        """Malformed text is refused, and so is a clock past 63 bits (SQLite's INTEGER) or a writer that is
        not an id."""
        with pytest.raises(ValueError):
            Version.parse(bad)

    @given(versions)
    def test_parse_version_of_bytes(self, v: Version) -> None:
        """parse_version reads a version's wire bytes as Version.parse reads its text, again from its memo."""
        v = Version(v.clock, "gw-1" + v.writer)
        raw = str(v).encode()
        assert parse_version(raw) == Version.parse(str(v))
        assert parse_version(raw) == v

    @pytest.mark.parametrize("bad", [b"", b"x-1", str(2**63).encode(), b"1-a b", b"1-\xff", "٣-a".encode()])
    def test_parse_version_rejects_every_time(self, bad: bytes) -> None:
        """parse_version refuses what Version.parse refuses (bytes that are not ASCII too), with ValueError,
        on every call: a refusal is not remembered as a version."""
        for _ in range(2):
            with pytest.raises(ValueError):
                parse_version(bad)

    def test_parse_bounds(self) -> None:
        """The largest clock and the longest writer are read."""
        assert Version.parse(f"{2**63 - 1}-{'w' * 64}") == Version(2**63 - 1, "w" * 64)

    def test_zero_is_oldest(self) -> None:
        """ZERO is below every issued version."""
        assert HybridClock("a").tick(0) > ZERO


class HybridClockTests:
    """The hybrid logical clock."""

    def test_monotonic_despite_wall_clock(self) -> None:
        """Versions increase even when the wall clock stands still or goes back."""
        clock = HybridClock("g1")
        issued = [clock.tick(t) for t in (1000, 1000, 999, 500, 1001, 1001)]
        assert issued == sorted(issued) and len(set(issued)) == len(issued)
        assert issued[0].millis == 1000 and issued[4].millis == 1001

    def test_observe_moves_past(self) -> None:
        """After observing another writer's version, the next tick is later."""
        mine, theirs = HybridClock("a"), HybridClock("b")
        seen = theirs.tick(5000)
        assert mine.observe(seen, 10)
        assert mine.tick(10) > seen

    def test_far_future_not_observed(self) -> None:
        """A version more than max_skew_ms ahead of now is not admitted, and observing it moves nothing."""
        clock = HybridClock("a", max_skew_ms=1000)
        now = 1_700_000_000_000
        near, far = Version((now + 1000) << 16, "b"), Version((now + 1001) << 16, "b")
        assert clock.admits(near, now) and not clock.admits(far, now)
        assert clock.observe(far, now) is False and clock.last == 0
        assert clock.observe(near, now) is True and clock.last == near.clock
        assert clock.tick(now) > near

    def test_no_overflow(self) -> None:
        """The limit never passes MAX_CLOCK, and nothing a peer sends can push the clock past it."""
        clock = HybridClock("a")
        assert clock.limit(2**62) == MAX_CLOCK
        assert clock.observe(Version(MAX_CLOCK, "x"), 1_700_000_000_000) is False
        assert clock.tick(1_700_000_000_000).clock < MAX_CLOCK

    def test_cas_is_clock(self) -> None:
        """The cas unique is the clock part, a 64-bit number."""
        v = HybridClock("a").tick(1_700_000_000_000)
        assert v.cas == v.clock < 2**64


class RecordTests:
    """Merging and expiry."""

    @given(st.lists(records, min_size=1, max_size=6), st.randoms())
    def test_resolve_is_order_free(self, batch: list[Record], rnd) -> None:  # type: ignore[no-untyped-def]
        """Applying records in any order, repeated or not, keeps the highest version."""
        shuffled = batch + batch[:2]
        rnd.shuffle(shuffled)
        kept: Record | None = None
        for record in shuffled:
            kept = resolve(kept, record)
        assert kept is not None
        assert kept.version == max(r.version for r in batch)

    def test_resolve_keeps_current_on_tie(self) -> None:
        """An equal version does not replace what is stored."""
        current = Record(b"a", version=Version(5, "x"))
        assert resolve(current, Record(b"b", version=Version(5, "x"))) is current

    def test_memcached_exptime(self) -> None:
        """0 never expires; up to 30 days is relative; above is absolute; negative is already past."""
        now = 1_700_000_000.5
        assert expires_at_from_exptime(0, now) == 0
        assert expires_at_from_exptime(10, now) == 1_700_000_010
        assert expires_at_from_exptime(RELATIVE_EXPIRY_LIMIT, now) == int(now) + RELATIVE_EXPIRY_LIMIT
        assert expires_at_from_exptime(RELATIVE_EXPIRY_LIMIT + 1, now) == RELATIVE_EXPIRY_LIMIT + 1
        assert Record(b"", expires_at=expires_at_from_exptime(-1, now)).expired(now)

    def test_live(self) -> None:
        """Tombstones and expired records are not live."""
        assert Record(b"v").live(10)
        assert not Record(b"v", expires_at=10).live(10)
        assert Record(b"v", expires_at=11).live(10)
        assert not Record.deleted(Version(1)).live(0)

    def test_purgeable(self) -> None:
        """Expired records go at once; tombstones after the grace period counted from their version."""
        assert purgeable(Record(b"v", expires_at=5), now=6)
        assert not purgeable(Record(b"v"), now=10**10)
        stone = Record.deleted(HybridClock("a").tick(1_000_000))
        assert not purgeable(stone, now=1000 + 10, tombstone_grace=60)
        assert purgeable(stone, now=1000 + 60, tombstone_grace=60)


class KeyTests:
    """memcached's key rule."""

    @pytest.mark.parametrize("key", [b"a", b"x" * 250, "clé".encode(), b"a/b:c"])
    def test_accepts(self, key: bytes) -> None:
        """1-250 bytes without spaces or control characters pass."""
        assert check_key(key) == key

    @pytest.mark.parametrize("key", [b"", b"x" * 251, b"a b", b"a\r\nb", b"\x00", b"a\x7f", b"\tx"])
    def test_rejects(self, key: bytes) -> None:
        """Empty, long, spaces and control characters are refused."""
        with pytest.raises(BadKey):
            check_key(key)
