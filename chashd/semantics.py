"""memcached's command semantics over versioned records.

Both roles need the same rules for what a write does to a key: the kvstore runs them on its engine,
and a kvstore that is a key's primary runs them for the gateway (``XApply``). ``apply_write`` takes the
record stored now (or None), a write command and the version to stamp on what it writes, and returns
the record to store (None: nothing changes) with memcached's reply. A missing, expired or deleted
(tombstoned) record counts as absent, as an evicted item does in memcached.

The rules are memcached 1.6's (``do_store_item``, ``do_add_delta`` and ``process_*_command`` in its
``memcached.c``/``proto_text.c``):

- ``set`` always stores; ``add`` only when absent, ``replace`` only when present (else ``NOT_STORED``);
- ``append``/``prepend`` need a present record and keep its flags and expiry; a result over the value
  size limit is ``NOT_STORED``;
- ``cas`` is ``NOT_FOUND`` when absent, ``EXISTS`` when the unique differs (0 never matches), else stores;
- ``delete`` writes a tombstone (``DELETED``) or answers ``NOT_FOUND``;
- ``incr``/``decr`` read the value as memcached's ``strtoull`` does (leading blanks, a ``+`` sign and
  trailing blanks are fine; anything else raises ``NonNumericValue``), wrap at 2**64 on ``incr``, stop at 0
  on ``decr``, and keep the value's length when the new number is not longer (padded with spaces, as
  memcached rewrites an item in place); flags and expiry are kept;
- ``touch`` sets a new expiry (``TOUCHED``) or answers ``NOT_FOUND``.

What the meta commands add (memcached's ``ms``/``md``/``ma``): an ``append``/``prepend`` or a ``delete``
given a ``cas_unique`` is ``EXISTS`` unless it is the item's cas; an ``incr``/``decr`` given one likewise,
given an ``exptime`` sets that expiry on success, and given ``vivify`` creates a missing item holding the
number ``initial`` (answered as is) with that exptime.

Unlike memcached, every change (a touch included) gets the new version, so the cas unique of a record
(``version.cas``) changes on touch too: replicas need it to tell which write is the latest.

Pure: no Twisted, and time comes in as ``now``.
"""

from __future__ import annotations

from chashd.commands import Arith, Delete, Number, Status, Store, Touch, WriteCommand
from chashd.errors import NonNumericValue, ValueTooLarge
from chashd.record import Record, expires_at_from_exptime
from chashd.versions import Version

__all__ = [
    "MAX_U64",
    "apply_write",
    "live",
    "parse_counter",
    "touched",
]

MAX_U64 = (1 << 64) - 1
_BLANKS = b" \t\n\v\f\r"


def live(record: Record | None, now: float) -> Record | None:
    """``record`` when a read should see it (present, not deleted, not expired), else None."""
    if record is None or record.tombstone or (record.expires_at != 0 and record.expires_at <= now):
        return None
    return record


def touched(record: Record, exptime: int, version: Version, now: float) -> Record:
    """``record`` with a new expiry from memcached's ``exptime`` (as ``touch`` and ``gat`` set it)."""
    return Record(record.value, record.flags, expires_at_from_exptime(exptime, now), version, False)


def parse_counter(value: bytes) -> int:
    """The number an ``incr``/``decr`` reads from a stored value, as memcached's ``safe_strtoull``.

    memcached parses the item's data followed by its ``\\r\\n`` as a C string: leading blanks and a sign
    are skipped, the digits must be followed by a blank or the end, and a number that does not fit in 64
    bits, an empty value or a negative number is not numeric. Raises ``NonNumericValue``.
    """
    if value.isdigit():  # the common case: nothing but digits
        number = int(value)
        if number > MAX_U64:
            raise NonNumericValue()
        return number
    if not value:
        raise NonNumericValue()
    text = value + b"\r\n"
    nul = text.find(b"\0")
    if nul >= 0:
        text = text[:nul]
    i = 0
    while i < len(text) and text[i] in _BLANKS:
        i += 1
    negative = False
    if i < len(text) and text[i] in b"+-":
        negative = text[i] == 0x2D
        i += 1
    start = i
    while i < len(text) and 0x30 <= text[i] <= 0x39:
        i += 1
    if i == start or (i < len(text) and text[i] not in _BLANKS):
        raise NonNumericValue()
    number = int(text[start:i])
    if number > MAX_U64:
        raise NonNumericValue()
    if negative:
        number = -number & MAX_U64
        if number > MAX_U64 >> 1:  # "negative" as a signed number, and a '-' was written
            raise NonNumericValue()
    return number


def _store(
    current: Record | None, command: Store, version: Version, now: float, limit: int
) -> tuple[Record | None, Status]:
    mode = command.mode
    if len(command.value) > limit:
        raise ValueTooLarge(len(command.value), limit)
    present = live(current, now)
    if mode == "set":
        pass
    elif mode == "add":
        if present is not None:
            return None, Status.NOT_STORED
    elif mode == "replace":
        if present is None:
            return None, Status.NOT_STORED
    elif mode == "cas":
        if present is None:
            return None, Status.NOT_FOUND
        if command.cas_unique != present.version.cas:
            return None, Status.EXISTS
    else:  # append, prepend
        if present is None:
            return None, Status.NOT_STORED
        if command.cas_unique is not None and command.cas_unique != present.version.cas:
            return None, Status.EXISTS
        value = present.value + command.value if mode == "append" else command.value + present.value
        if len(value) > limit:
            return None, Status.NOT_STORED
        return Record(value, present.flags, present.expires_at, version, False), Status.STORED
    record = Record(command.value, command.flags, expires_at_from_exptime(command.exptime, now), version, False)
    return record, Status.STORED


def _arith(
    current: Record | None, command: Arith, version: Version, now: float
) -> tuple[Record | None, Status | Number]:
    present = live(current, now)
    if present is None:
        if command.vivify is None:
            return None, Status.NOT_FOUND
        expires_at = expires_at_from_exptime(command.vivify, now)
        return Record(b"%d" % command.initial, 0, expires_at, version, False), Number(command.initial)
    if command.cas_unique is not None and command.cas_unique != present.version.cas:
        return None, Status.EXISTS
    number = parse_counter(present.value)
    if command.incr:
        number = (number + command.delta) & MAX_U64
    else:
        number = number - command.delta if command.delta < number else 0
    digits = b"%d" % number
    old_length = len(present.value)
    value = digits + b" " * (old_length - len(digits)) if len(digits) <= old_length else digits
    expires_at = present.expires_at if command.exptime is None else expires_at_from_exptime(command.exptime, now)
    return Record(value, present.flags, expires_at, version, False), Number(number)


def apply_write(
    current: Record | None, command: WriteCommand, version: Version, now: float, max_value_size: int
) -> tuple[Record | None, Status | Number]:
    """Run a write as memcached would: the record to store (None: nothing changes) and the reply.

    ``version`` stamps whatever is written; the caller makes sure it is newer than ``current``'s.
    Raises ``ValueTooLarge`` for a stored value over ``max_value_size`` and ``NonNumericValue`` for an
    ``incr``/``decr`` of a value that is not a number.
    """
    if type(command) is Store:
        return _store(current, command, version, now, max_value_size)
    if type(command) is Arith:
        return _arith(current, command, version, now)
    if type(command) is Delete:
        present = live(current, now)
        if present is None:
            return None, Status.NOT_FOUND
        if command.cas_unique is not None and command.cas_unique != present.version.cas:
            return None, Status.EXISTS
        return Record.deleted(version), Status.DELETED
    if type(command) is Touch:
        present = live(current, now)
        if present is None:
            return None, Status.NOT_FOUND
        return touched(present, command.exptime, version, now), Status.TOUCHED
    raise TypeError(f"not a write command: {command!r}")
