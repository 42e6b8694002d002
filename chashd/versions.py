# -*- test-case-name: tests.unit.test_versions_records -*-
"""Versions: a hybrid logical clock value plus the writer's id.

A version orders writes to one key across every replica: the higher version wins, so applying the same
write twice, or two writes out of order, ends in the same state (last writer wins). The clock part is
``milliseconds << 16 | counter``; it is also the memcached ``cas`` unique of the record. The writer id (the
gateway or kvstore that accepted the write) breaks ties between writers whose clocks agree.

Versions that come from the wire are bounded: ``Version.parse`` refuses a clock part past ``MAX_CLOCK``
(the engines keep it in a signed 64-bit integer column) or a writer that is not an id, and a
``HybridClock`` admits (``admits``, ``observe``) only versions at most ``max_skew_ms`` ahead of the time it
is given, so a forged far-future version can neither be stored nor drag the clock along (SECURITY.md).

Pure: time comes in as an argument.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple

__all__ = ["DEFAULT_MAX_SKEW_MS", "MAX_CLOCK", "ZERO", "HybridClock", "Version", "parse_version"]

_COUNTER_BITS = 16
_COUNTER_MASK = (1 << _COUNTER_BITS) - 1
#: The largest clock part: SQLite's INTEGER is signed 64-bit (milliseconds up to the year 4200 or so).
MAX_CLOCK = (1 << 63) - 1
#: How far ahead of a receiver's clock a version may be: five minutes.
DEFAULT_MAX_SKEW_MS = 5 * 60 * 1000
#: A writer is a node or gateway id (``chashd.config.parse_node_id``), or nothing.
_WRITER = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]{0,63})?")


class Version(NamedTuple):
    """``(clock, writer)``, ordered by clock, then writer id.

    A named tuple rather than a frozen dataclass: every record read builds one, and a tuple is built
    in a third of the time (and tuples of plain values are left alone by the garbage collector).
    """

    clock: int
    writer: str = ""

    def __eq__(self, other: object) -> bool:
        return type(other) is Version and tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return tuple.__hash__(self)

    @property
    def millis(self) -> int:
        """The wall-clock milliseconds the clock part carries."""
        return self.clock >> _COUNTER_BITS

    @property
    def cas(self) -> int:
        """The memcached cas unique (a 64-bit number): the clock part."""
        return self.clock

    def __str__(self) -> str:
        return f"{self.clock}-{self.writer}" if self.writer else str(self.clock)

    @classmethod
    def parse(cls, text: str) -> Version:
        """Read ``str(version)`` back; raises ``ValueError`` (also for a clock past ``MAX_CLOCK`` or a writer
        that is not an id)."""
        clock, _, writer = text.partition("-")
        if not (clock.isascii() and clock.isdigit()) or len(clock) > 19 or int(clock) > MAX_CLOCK:
            raise ValueError(f"not a version: {text[:100]!r}")
        if not _WRITER.fullmatch(writer):
            raise ValueError(f"not a version: {text[:100]!r}")
        return cls(int(clock), writer)


@lru_cache(maxsize=1 << 16)
def parse_version(raw: bytes) -> Version:
    """``Version.parse`` of a version's bytes (as they come on the wire), memoized: a version is parsed each
    time a record or a version crosses the line protocol, and the same key's reads and writes carry the same
    few versions; an immutable value, so every caller may share it. Raises ``ValueError`` (a bad version, or
    bytes that are not ASCII); refusals are not remembered. Bounded (least recently used)."""
    return Version.parse(raw.decode("ascii"))


#: Older than every real version.
ZERO = Version(0, "")


class HybridClock:
    """Issues increasing versions for one writer from wall-clock milliseconds given by the caller.

    ``tick(now_ms)`` never goes backwards, even when the wall clock does, and ``observe(version, now_ms)``
    moves the clock past a version seen from another writer, so causally later writes get higher
    versions; but only a version ``admits`` takes (at most ``max_skew_ms`` ahead of ``now_ms``): one
    further ahead is a forgery or a broken clock, and observing it would pin every later write to it.
    """

    __slots__ = ("_last", "max_skew_ms", "writer")

    def __init__(self, writer: str, max_skew_ms: int = DEFAULT_MAX_SKEW_MS) -> None:
        self.writer = writer
        self.max_skew_ms = max_skew_ms
        self._last = 0

    def tick(self, now_ms: int) -> Version:
        """A new version, greater than every version issued or observed so far."""
        candidate = int(now_ms) << _COUNTER_BITS
        self._last = candidate if candidate > self._last else self._last + 1
        return Version(self._last, self.writer)

    def limit(self, now_ms: int) -> int:
        """The highest clock part admitted at ``now_ms``: ``max_skew_ms`` ahead (and never past MAX_CLOCK)."""
        return min(MAX_CLOCK, ((int(now_ms) + self.max_skew_ms) << _COUNTER_BITS) | _COUNTER_MASK)

    def admits(self, version: Version, now_ms: int) -> bool:
        """True when ``version`` is not too far ahead of ``now_ms`` (see ``limit``)."""
        return version.clock <= self.limit(now_ms)

    def observe(self, version: Version, now_ms: int) -> bool:
        """Move past ``version`` (a version seen from another writer) if the clock admits it at ``now_ms``;
        False (and the clock left as it is) when it does not."""
        if version.clock > self.limit(now_ms):
            return False
        self._last = max(self._last, version.clock)
        return True

    @property
    def last(self) -> int:
        """The last clock value issued or observed."""
        return self._last

    @staticmethod
    def counter(version: Version) -> int:
        """The counter part of a version (writes within one millisecond)."""
        return version.clock & _COUNTER_MASK
