# -*- test-case-name: tests.unit.test_versions_records -*-
"""Records: what a kvstore keeps for a key, and the rule that merges two of them.

A record holds the value bytes, the memcached ``flags`` (unsigned 32-bit, opaque), ``expires_at`` (a Unix
time in seconds, 0 for never), its ``version`` and whether it is a tombstone (a delete). Replicas keep the
record with the highest version (``resolve``), so applying the same record twice, or records out of
order, is harmless.

Expiry follows memcached: an ``exptime`` of 0 never expires, a negative one has already expired, up to 30
days it is relative to now, above that it is a Unix time.

Pure: time comes in as an argument.
"""

from __future__ import annotations

from typing import NamedTuple

from chashd.errors import BadKey
from chashd.versions import ZERO, Version

__all__ = [
    "MAX_EXPIRES_AT",
    "MAX_FLAGS",
    "MAX_KEY_LENGTH",
    "RELATIVE_EXPIRY_LIMIT",
    "TOMBSTONE_GRACE",
    "Record",
    "check_key",
    "expires_at_from_exptime",
    "purgeable",
    "resolve",
]

MAX_KEY_LENGTH = 250
MAX_FLAGS = (1 << 32) - 1
#: The latest expiry time a record may carry from the wire (an unsigned 32-bit Unix time, as memcached's).
MAX_EXPIRES_AT = (1 << 32) - 1
#: memcached's rule: an exptime above 30 days is an absolute Unix time.
RELATIVE_EXPIRY_LIMIT = 60 * 60 * 24 * 30
#: Seconds a tombstone is kept before it may be purged (default 24 h).
TOMBSTONE_GRACE = 24 * 60 * 60.0


class Record(NamedTuple):
    """One key's state on a replica.

    A named tuple rather than a frozen dataclass: engines build one for every read, and a tuple is
    built in a third of the time.
    """

    value: bytes
    flags: int = 0
    expires_at: int = 0
    version: Version = ZERO
    tombstone: bool = False

    def expired(self, now: float) -> bool:
        """True once the expiry time has passed."""
        return self.expires_at != 0 and self.expires_at <= now

    def live(self, now: float) -> bool:
        """True when a read should see this record: not deleted and not expired."""
        return not self.tombstone and not (self.expires_at != 0 and self.expires_at <= now)

    def __eq__(self, other: object) -> bool:
        return type(other) is Record and tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return tuple.__hash__(self)

    def newer_than(self, other: Record | None) -> bool:
        """True when this record wins over ``other`` (None loses to everything)."""
        return other is None or self.version > other.version

    def with_version(self, version: Version) -> Record:
        """The same record under another version."""
        return self._replace(version=version)

    @classmethod
    def deleted(cls, version: Version) -> Record:
        """A tombstone written at ``version``."""
        return cls(b"", 0, 0, version, True)

    @property
    def size(self) -> int:
        """Bytes of value held."""
        return len(self.value)


_FORBIDDEN = bytes(range(33)) + b"\x7f"


def check_key(key: bytes) -> bytes:
    """Return ``key`` if it is a valid key (1-250 bytes, no space or control character); else raise ``BadKey``.

    This is memcached's rule, applied by both surfaces so that they accept the same keys.
    """
    if not key:
        raise BadKey("key is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise BadKey(f"key is longer than {MAX_KEY_LENGTH} bytes")
    if key.translate(None, _FORBIDDEN) != key:
        raise BadKey("key holds a space or a control character")
    return key


def resolve(current: Record | None, incoming: Record) -> Record:
    """The record a replica keeps when ``incoming`` meets ``current``: the higher version."""
    if current is None or incoming.version > current.version:
        return incoming
    return current


def expires_at_from_exptime(exptime: int, now: float) -> int:
    """memcached's exptime as an absolute Unix time (0 = never; a negative exptime is already past)."""
    if exptime == 0:
        return 0
    if exptime < 0:
        return 1
    if exptime <= RELATIVE_EXPIRY_LIMIT:
        return int(now) + exptime
    return exptime


def purgeable(record: Record, now: float, tombstone_grace: float = TOMBSTONE_GRACE) -> bool:
    """True when a replica may forget ``record``: expired, or a tombstone older than the grace period."""
    if record.tombstone:
        return record.version.millis / 1000.0 + tombstone_grace <= now
    return record.expired(now)
