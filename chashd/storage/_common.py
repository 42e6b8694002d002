"""What both engines share: the rules of a scan range.

Pure: no Twisted, no clock.
"""

from __future__ import annotations

from chashd.ring import HASH_SPACE

__all__ = ["TOP_HASH", "check_range"]

#: The highest ring hash.
TOP_HASH = HASH_SPACE - 1


def check_range(first_hash: int, last_hash: int, limit: int) -> None:
    """Raise ``ValueError`` unless ``0 <= first_hash <= last_hash <= TOP_HASH`` and ``limit`` is positive.

    A range that wraps around the top of the hash space must be scanned as two ranges (``moved_arcs``
    already splits them); refusing one here catches a caller that would otherwise hand off nothing.
    """
    if not 0 <= first_hash <= last_hash <= TOP_HASH:
        raise ValueError(f"not a hash range: {first_hash}..{last_hash} (split a wrapping range in two)")
    if limit <= 0:
        raise ValueError(f"limit must be positive, not {limit}")
