"""The bulk page: many records in one length-prefixed block, the body of the ``xbulk`` command.

A handoff (or a repair) moves records between kvstores a page at a time. Sent one ``xmove`` each, a record
cost a command line to format and to parse and a ``Record`` on both sides; a page is read by the sender
straight from the engine's rows (``IStorageEngine.scan_rows``), encoded here in one pass, and applied by the
receiver's engine in one grouped write (``IStorageEngine.apply_rows``) from the rows decoded here, with no
``Record`` on either side.

Layout of a page of ``n`` rows (``xbulk <n> <bytes>``; every integer little-endian)::

    n row heads, 24 bytes each:  key length u16, writer length u8, flags u32, expires_at u32,
                                 clock u64, tombstone u8, value length u32
    then, row after row:         key bytes, writer bytes (ASCII), value bytes

The heads come first so that the receiver reads them all in one ``struct.iter_unpack``. A row is the tuple
``BulkRow``: ``(key, value, flags, expires_at, clock, writer, tombstone)``, the record's fields with its
version as ``clock`` and ``writer``. ``decode_rows`` checks every field as ``xput``'s parser does (a key of
1 to 250 bytes without space, CR, LF or NUL; a writer id; a clock under 2**63; a value no longer than the
receiver's limit) and that the lengths add up to the block exactly; anything else raises ``BulkError``.

Pure: no Twisted, no clock.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterable, Sequence
from operator import itemgetter
from typing import TypeAlias

from chashd.record import MAX_KEY_LENGTH
from chashd.versions import MAX_CLOCK

__all__ = [
    "BULK_FORMAT",
    "ROW_HEAD_SIZE",
    "BulkError",
    "BulkRow",
    "decode_rows",
    "encode_rows",
    "page_size",
    "run_digest",
    "run_digest_of",
    "split_rows",
]

#: The page layout this code reads and writes; a server answers the probe (a bare ``xbulk``) with it.
BULK_FORMAT = 1
#: ``(key, value, flags, expires_at, clock, writer, tombstone)``.
BulkRow: TypeAlias = tuple[bytes, bytes, int, int, int, str, int]

_HEAD = struct.Struct("<HBIIQBI")
#: Bytes of a row's head.
ROW_HEAD_SIZE = _HEAD.size
_BAD_KEY_BYTE = re.compile(rb"[ \r\n\x00]")
_WRITER = re.compile(rb"([A-Za-z0-9][A-Za-z0-9._-]{0,63})?")


class BulkError(ValueError):
    """A page that does not decode, with what is wrong in it."""


def page_size(row: BulkRow) -> int:
    """The bytes ``row`` takes in a page."""
    return ROW_HEAD_SIZE + len(row[0]) + len(row[5]) + len(row[1])


def encode_rows(rows: Iterable[BulkRow]) -> tuple[int, bytes]:
    """The page of ``rows``: ``(row count, block)``. The caller checked the rows (they come from an engine)."""
    pack = _HEAD.pack
    heads: list[bytes] = []
    blobs: list[bytes] = []
    add_head = heads.append
    add_blobs = blobs.extend
    for key, value, flags, expires_at, clock, writer, tombstone in rows:
        writer_bytes = writer.encode("ascii")
        add_head(pack(len(key), len(writer_bytes), flags, expires_at, clock, tombstone, len(value)))
        add_blobs((key, writer_bytes, value))
    heads.extend(blobs)
    return len(blobs) // 3, b"".join(heads)


def decode_rows(block: bytes, count: int, max_value_size: int) -> list[BulkRow]:
    """The ``count`` rows of a page; raises ``BulkError`` saying what is wrong with a page that is not one."""
    heads_end = count * ROW_HEAD_SIZE
    if count < 0 or heads_end > len(block):
        raise BulkError(f"{count} rows announced in {len(block)} bytes")
    rows: list[BulkRow] = []
    add = rows.append
    writers: dict[bytes, str] = {}
    bad_key = _BAD_KEY_BYTE.search
    pos = heads_end
    for key_length, writer_length, flags, expires_at, clock, tombstone, value_length in _HEAD.iter_unpack(
        memoryview(block)[:heads_end]
    ):
        key = block[pos : pos + key_length]
        pos += key_length
        writer_bytes = block[pos : pos + writer_length]
        pos += writer_length
        value = block[pos : pos + value_length]
        pos += value_length
        if not 0 < key_length <= MAX_KEY_LENGTH or bad_key(key) is not None:
            raise BulkError(f"row {len(rows)}: bad key")
        if clock > MAX_CLOCK or tombstone > 1:
            raise BulkError(f"row {len(rows)}: bad version or tombstone")
        if value_length > max_value_size:
            raise BulkError(f"row {len(rows)}: a value of {value_length} bytes, over the limit of {max_value_size}")
        writer = writers.get(writer_bytes)
        if writer is None:
            if not _WRITER.fullmatch(writer_bytes):
                raise BulkError(f"row {len(rows)}: bad writer")
            writer = writers[writer_bytes] = writer_bytes.decode("ascii")
        add((key, value, flags, expires_at, clock, writer, tombstone))
    if pos != len(block):
        raise BulkError(f"the rows take {pos} bytes of a block of {len(block)}")
    return rows


def split_rows(rows: Sequence[BulkRow], max_rows: int, max_bytes: int) -> list[Sequence[BulkRow]]:
    """``rows`` cut into pages of at most ``max_rows`` rows and ``max_bytes`` bytes (a row larger than that
    gets a page of its own)."""
    pages: list[Sequence[BulkRow]] = []
    start = 0
    size = 0
    head = ROW_HEAD_SIZE
    for index, row in enumerate(rows):
        row_size = head + len(row[0]) + len(row[5]) + len(row[1])
        if index > start and (index - start >= max_rows or size + row_size > max_bytes):
            pages.append(rows[start:index])
            start, size = index, 0
        size += row_size
    if start < len(rows):
        pages.append(rows[start:])
    return pages


_KEY_OF = itemgetter(0)
_CLOCK_OF = itemgetter(4)
_WRITER_OF = itemgetter(5)


def run_digest(rows: Sequence[BulkRow]) -> bytes:
    """A digest of the keys and versions of ``rows``, in their order (not their values): equal for two runs
    of rows exactly when they hold the same keys with the same versions in the same order (but for a collision
    of BLAKE2b-128). The handoff keeps it of each run it pushed and drops later
    (``IStorageEngine.remove_run_if``), instead of the rows."""
    writers = {writer: writer.encode().hex() for writer in set(map(_WRITER_OF, rows))}
    return run_digest_of(
        len(rows),
        ",".join(map(bytes.hex, map(_KEY_OF, rows))).upper(),
        ",".join(map(str, map(_CLOCK_OF, rows))),
        ",".join(map(writers.__getitem__, map(_WRITER_OF, rows))).upper(),
    )


def run_digest_of(count: int, keys: str, clocks: str, writers: str) -> bytes:
    """``run_digest`` of ``count`` rows from their keys and writers in upper-case hex and their clocks in
    decimal, each joined with commas (what SQLite's ``group_concat(hex(key))`` and the like give): each part
    reads back one way, so the text, and the digest, tell the rows apart."""
    return hashlib.blake2b(f"{count}|{keys}|{clocks}|{writers}".encode("ascii"), digest_size=16).digest()
