"""Versions: a hybrid logical clock value plus the writer's id.

A version orders writes to one key across every replica: the higher version wins, so applying the same
write twice, or two writes out of order, ends in the same state (last writer wins). The clock part is
``milliseconds << 16 | counter``; it is also the memcached ``cas`` unique of the record. The writer id (the
gateway or kvstore that accepted the write) breaks ties between writers whose clocks agree.

Pure: time comes in as an argument.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["ZERO", "HybridClock", "Version"]

_COUNTER_BITS = 16
_COUNTER_MASK = (1 << _COUNTER_BITS) - 1
_MAX_CLOCK = (1 << 64) - 1


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
        """Read ``str(version)`` back; raises ``ValueError``."""
        clock, _, writer = text.partition("-")
        if not clock.isdigit() or int(clock) > _MAX_CLOCK:
            raise ValueError(f"not a version: {text!r}")
        return cls(int(clock), writer)


#: Older than every real version.
ZERO = Version(0, "")


class HybridClock:
    """Issues increasing versions for one writer from wall-clock milliseconds given by the caller.

    ``tick(now_ms)`` never goes backwards, even when the wall clock does, and ``observe(version)``
    moves the clock past a version seen from another writer, so causally later writes get higher
    versions.
    """

    __slots__ = ("_last", "writer")

    def __init__(self, writer: str) -> None:
        self.writer = writer
        self._last = 0

    def tick(self, now_ms: int) -> Version:
        """A new version, greater than every version issued or observed so far."""
        candidate = int(now_ms) << _COUNTER_BITS
        self._last = candidate if candidate > self._last else self._last + 1
        return Version(self._last, self.writer)

    def observe(self, version: Version) -> None:
        """Move past ``version`` (a version seen from another writer)."""
        self._last = max(self._last, version.clock)

    @property
    def last(self) -> int:
        """The last clock value issued or observed."""
        return self._last

    @staticmethod
    def counter(version: Version) -> int:
        """The counter part of a version (writes within one millisecond)."""
        return version.clock & _COUNTER_MASK
