"""memcached's write semantics over versioned records (chashd.semantics)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chashd.commands import Arith, Delete, Number, Status, Store, Touch
from chashd.errors import NonNumericValue, ValueTooLarge
from chashd.record import Record
from chashd.semantics import MAX_U64, apply_write, live, parse_counter, touched
from chashd.versions import Version

NOW = 1_700_000_000.0
OLD = Version(100, "a")
NEW = Version(200, "b")
LIMIT = 1024

PRESENT = Record(b"old", 7, 0, OLD)
EXPIRED = Record(b"old", 7, int(NOW) - 1, OLD)
TOMBSTONE = Record.deleted(OLD)
ABSENT_STATES = [None, EXPIRED, TOMBSTONE]


def store(mode: str, value: bytes = b"new", flags: int = 3, exptime: int = 0, cas: int | None = None) -> Store:
    return Store(mode, b"k", flags, exptime, value, cas)  # type: ignore[arg-type]


def run(current: Record | None, command: object, limit: int = LIMIT) -> tuple[Record | None, object]:
    return apply_write(current, command, NEW, NOW, limit)  # type: ignore[arg-type]


class LiveTests:
    """Which stored records a read sees."""

    def test_absent_states(self) -> None:
        """Missing, expired and tombstoned records are not live; a present one is."""
        for state in ABSENT_STATES:
            assert live(state, NOW) is None
        assert live(PRESENT, NOW) is PRESENT

    def test_expiry_boundary(self) -> None:
        """A record expires at its expires_at second, not before."""
        record = Record(b"v", 0, int(NOW) + 1, OLD)
        assert live(record, NOW) is record
        assert live(record, NOW + 1) is None

    def test_touched(self) -> None:
        """touched() keeps value and flags, sets the expiry and the version."""
        record = touched(PRESENT, 10, NEW, NOW)
        assert record == Record(b"old", 7, int(NOW) + 10, NEW)


class StoreTests:
    """set, add, replace, append, prepend, cas."""

    def test_set_stores_whatever_is_there(self) -> None:
        """set stores over a present, missing, expired or deleted record, with the new version."""
        for state in [PRESENT, *ABSENT_STATES]:
            record, reply = run(state, store("set", exptime=10))
            assert reply is Status.STORED
            assert record == Record(b"new", 3, int(NOW) + 10, NEW)

    def test_add(self) -> None:
        """add stores only when the key is absent."""
        assert run(PRESENT, store("add")) == (None, Status.NOT_STORED)
        for state in ABSENT_STATES:
            record, reply = run(state, store("add"))
            assert reply is Status.STORED and record == Record(b"new", 3, 0, NEW)

    def test_replace(self) -> None:
        """replace stores only when the key is present, with the new flags and expiry."""
        record, reply = run(PRESENT, store("replace", exptime=-1))
        assert reply is Status.STORED and record == Record(b"new", 3, 1, NEW)
        for state in ABSENT_STATES:
            assert run(state, store("replace")) == (None, Status.NOT_STORED)

    def test_append_prepend_keep_flags_and_expiry(self) -> None:
        """append and prepend join the values and keep the stored flags and expiry."""
        current = Record(b"mid", 9, int(NOW) + 50, OLD)
        assert run(current, store("append", b"+", flags=1, exptime=5)) == (
            Record(b"mid+", 9, int(NOW) + 50, NEW),
            Status.STORED,
        )
        assert run(current, store("prepend", b"-", flags=1, exptime=5)) == (
            Record(b"-mid", 9, int(NOW) + 50, NEW),
            Status.STORED,
        )

    def test_append_prepend_need_a_present_record(self) -> None:
        """append and prepend to an absent key are NOT_STORED."""
        for state in ABSENT_STATES:
            assert run(state, store("append")) == (None, Status.NOT_STORED)
            assert run(state, store("prepend")) == (None, Status.NOT_STORED)

    def test_append_over_the_limit_is_not_stored(self) -> None:
        """A joined value over the size limit is NOT_STORED, as memcached's failed allocation."""
        current = Record(b"x" * 10, 0, 0, OLD)
        assert run(current, store("append", b"y" * 5), limit=14) == (None, Status.NOT_STORED)
        record, reply = run(current, store("append", b"y" * 4), limit=14)
        assert reply is Status.STORED and record is not None and record.value == b"x" * 10 + b"yyyy"

    def test_cas(self) -> None:
        """cas stores when the unique matches, EXISTS when it differs, NOT_FOUND when absent."""
        record, reply = run(PRESENT, store("cas", cas=OLD.cas))
        assert reply is Status.STORED and record == Record(b"new", 3, 0, NEW)
        assert run(PRESENT, store("cas", cas=OLD.cas + 1)) == (None, Status.EXISTS)
        assert run(PRESENT, store("cas", cas=0)) == (None, Status.EXISTS)
        for state in ABSENT_STATES:
            assert run(state, store("cas", cas=OLD.cas)) == (None, Status.NOT_FOUND)

    def test_value_over_the_limit_raises(self) -> None:
        """A stored value over the limit raises ValueTooLarge whatever the mode; at the limit it is fine."""
        for mode in ("set", "add", "replace", "append", "prepend", "cas"):
            with pytest.raises(ValueTooLarge):
                run(PRESENT, store(mode, b"v" * (LIMIT + 1), cas=OLD.cas))
        assert run(None, store("set", b"v" * LIMIT))[1] is Status.STORED


class DeleteTouchTests:
    """delete and touch."""

    def test_delete_writes_a_tombstone(self) -> None:
        """delete of a present key writes a tombstone with the new version."""
        assert run(PRESENT, Delete(b"k")) == (Record.deleted(NEW), Status.DELETED)

    def test_delete_absent(self) -> None:
        """delete of an absent key is NOT_FOUND and changes nothing."""
        for state in ABSENT_STATES:
            assert run(state, Delete(b"k")) == (None, Status.NOT_FOUND)

    def test_touch(self) -> None:
        """touch sets a new expiry (relative, absolute, past) and a new version."""
        assert run(PRESENT, Touch(b"k", 100)) == (Record(b"old", 7, int(NOW) + 100, NEW), Status.TOUCHED)
        assert run(PRESENT, Touch(b"k", 0)) == (Record(b"old", 7, 0, NEW), Status.TOUCHED)
        assert run(PRESENT, Touch(b"k", -1)) == (Record(b"old", 7, 1, NEW), Status.TOUCHED)
        far = int(NOW) + 10**6
        assert run(PRESENT, Touch(b"k", far)) == (Record(b"old", 7, far, NEW), Status.TOUCHED)

    def test_touch_absent(self) -> None:
        """touch of an absent key is NOT_FOUND."""
        for state in ABSENT_STATES:
            assert run(state, Touch(b"k", 10)) == (None, Status.NOT_FOUND)

    def test_not_a_write(self) -> None:
        """Anything but a write command is a TypeError."""
        with pytest.raises(TypeError):
            run(PRESENT, object())


def arith(value: bytes, delta: int, incr: bool = True) -> tuple[bytes, int]:
    expires_at = int(NOW) + 77
    record, reply = run(Record(value, 5, expires_at, OLD), Arith(b"k", delta, incr))
    assert record is not None and isinstance(reply, Number)
    assert (record.flags, record.expires_at, record.version) == (5, expires_at, NEW)
    return record.value, reply.value


class ArithTests:
    """incr and decr, with memcached's number rules and value lengths."""

    def test_incr_decr(self) -> None:
        """incr adds, decr subtracts."""
        assert arith(b"10", 5) == (b"15", 15)
        assert arith(b"10", 3, incr=False) == (b"7 ", 7)

    def test_incr_wraps_at_64_bits(self) -> None:
        """incr wraps around 2**64 and keeps the value's length, padding with spaces."""
        assert arith(b"18446744073709551615", 2) == (b"1" + b" " * 19, 1)
        assert arith(b"5", MAX_U64) == (b"4", 4)

    def test_decr_stops_at_zero(self) -> None:
        """decr never goes below 0."""
        assert arith(b"5", 6, incr=False) == (b"0", 0)
        assert arith(b"5", 5, incr=False) == (b"0", 0)

    def test_lengths_as_memcached(self) -> None:
        """A shorter number is padded to the old length; a longer one takes its own length."""
        assert arith(b"100", 91, incr=False) == (b"9  ", 9)
        assert arith(b"9  ", 1000) == (b"1009", 1009)
        assert arith(b"99", 1) == (b"100", 100)
        assert arith(b"05", 1) == (b"6 ", 6)

    def test_missing(self) -> None:
        """incr/decr of an absent key is NOT_FOUND."""
        for state in ABSENT_STATES:
            assert run(state, Arith(b"k", 1)) == (None, Status.NOT_FOUND)
            assert run(state, Arith(b"k", 1, incr=False)) == (None, Status.NOT_FOUND)

    def test_non_numeric_raises(self) -> None:
        """A value that is not a number raises NonNumericValue and changes nothing."""
        for value in [b"", b"abc", b"5x", b"-5", b"184467440737095516150", b"18446744073709551616", b"+", b" "]:
            with pytest.raises(NonNumericValue):
                run(Record(value, 0, 0, OLD), Arith(b"k", 1))


class ParseCounterTests:
    """memcached's safe_strtoull over an item's data."""

    def test_accepted_forms(self) -> None:
        """Digits, leading blanks, a + sign, trailing blanks and text after a blank are numbers."""
        cases = {
            b"0": 0,
            b"42": 42,
            b" 5": 5,
            b"\t5": 5,
            b"5 ": 5,
            b"+5": 5,
            b"5\tx": 5,
            b"5\r\n": 5,
            b"5\0junk": 5,
            b"-0": 0,
            b"18446744073709551615": MAX_U64,
            b"00000000000000000000000001": 1,
        }
        for value, number in cases.items():
            assert parse_counter(value) == number, value

    def test_rejected_forms(self) -> None:
        """Empty, letters, a negative number, overflow and a bare sign are not numbers."""
        for value in [b"", b"x", b"5x", b"-5", b"-1", b"18446744073709551616", b"+", b"-", b"\0", b" x"]:
            with pytest.raises(NonNumericValue):
                parse_counter(value)

    @given(st.integers(min_value=0, max_value=MAX_U64), st.sampled_from([b"", b" ", b"  x", b"\t"]))
    def test_digits_round_trip(self, number: int, suffix: bytes) -> None:
        """Any 64-bit number written in decimal, followed by blanks, reads back."""
        assert parse_counter(b"%d" % number + suffix) == number
