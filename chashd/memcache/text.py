"""The memcached text protocol: a pure parser and serializer, for the server and for the client.

The grammar (memcached's commands, their faults, and the versioned extension chashd's daemons use between
themselves) is the block comment that opens ``chashd/memcache/server.py``, the adapter that serves it.

Server side: ``RequestParser`` is fed bytes and yields ``chashd.commands`` commands or ``FailedRequest``
(a domain error of ``chashd.errors`` with memcached's text, whether to reply, whether to close);
``serialize_result`` and ``error_reply`` turn results and errors into reply bytes. Client side (the
gateway and the handoff): ``serialize_command`` is the inverse of parsing, and ``ReplyParser`` turns reply
bytes into results given the command that was sent.

Pure: no Twisted, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast, final

from chashd.commands import (
    Arith,
    Bulked,
    BulkFormat,
    BulkProbe,
    CacheMemlimit,
    Command,
    Delete,
    Digests,
    FlushAll,
    Get,
    KeyVersions,
    Lease,
    LruCrawler,
    MetaCommand,
    NoreplyCommand,
    Number,
    Quit,
    Result,
    Shutdown,
    SplicedGet,
    StatsCommand,
    StatsResult,
    Status,
    Store,
    StoreMode,
    Touch,
    Values,
    Verbosity,
    VersionCommand,
    VersionOf,
    WriteCommand,
    XApplied,
    XApply,
    XAuth,
    XBulk,
    XDeadline,
    XDigest,
    XEpoch,
    XFence,
    XGet,
    XLease,
    XList,
    XMap,
    XPut,
    XRelease,
    XVer,
)
from chashd.digests import MAX_HASH, MAX_PARTS, RangeDigest
from chashd.errors import (
    BadCommand,
    BadDataChunk,
    DeadlinePassed,
    DomainError,
    KeyLeased,
    NodeLeaving,
    NonNumericValue,
    RequestError,
    ServiceUnavailable,
    StaleMap,
    StaleVersion,
    Unauthenticated,
    UnknownCommand,
    ValueTooLarge,
)
from chashd.memcache.meta import MAX_OPAQUE
from chashd.record import MAX_EXPIRES_AT, MAX_FLAGS, MAX_KEY_LENGTH, Record
from chashd.versions import Version, parse_version

__all__ = [
    "BULK_PAGE_LIMIT",
    "DEFAULT_MAX_KEYS",
    "DEFAULT_MAX_LINE",
    "DEFAULT_MAX_VALUE_SIZE",
    "BadReply",
    "FailedRequest",
    "ReplyParser",
    "RequestParser",
    "error_from_reply",
    "error_reply",
    "fence_line",
    "plain_get_reply",
    "serialize_command",
    "serialize_result",
    "stats_reply",
    "version_reply",
]

DEFAULT_MAX_VALUE_SIZE = 1024 * 1024
#: The largest ``xbulk`` page a server reads, past the room one record of the largest value takes; the
#: handoff sends pages of at most 1 MiB (or one record).
BULK_PAGE_LIMIT = 8 * 1024 * 1024
#: memcached closes a connection that sends this many bytes without a newline (``try_read_command_ascii``).
DEFAULT_MAX_LINE = 2048
#: Keys in one get line; memcached has no limit, we bound the line to about 512 KiB.
DEFAULT_MAX_KEYS = 2048
#: memcached's read buffer: a longer line cannot arrive whole, and memcached closes the connection.
READ_BUFFER = 16384
#: memcached's MAX_TOKENS: a line is cut into at most 23 tokens (get lines are read on past that).
_MAX_TOKENS = 24
_INT_MAX = (1 << 31) - 1
_MAX_U64 = (1 << 64) - 1
_BLANKS = b" \t\n\v\f\r"

_BAD_FORMAT = "bad command line format"
_BAD_DELETE = "bad command line format.  Usage: delete <key> [noreply]"
_BAD_EXPTIME = "invalid exptime argument"
_BAD_DELTA = "invalid numeric delta argument"
_OUT_OF_MEMORY = "out of memory reading request"
#: memcached's MFLAG_MAX_OPT_LENGTH: a meta command of more tokens is refused.
_META_MAX_TOKENS = 20
_MS_MODES = frozenset({"", "E", "A", "P", "R", "S"})
_MA_MODES = frozenset({"", "I", "+", "D", "-"})
_META_NUMBER_ERRORS = {
    "C": "bad token in command line format",
    "J": "invalid numeric initial value",
    "D": "invalid numeric delta value",
}


class BadReply(ServiceUnavailable):
    """A server's reply that does not parse: the connection cannot be trusted any more."""


@final
@dataclass(frozen=True, slots=True)
class FailedRequest:
    """A request that failed: the error (its memcached text via ``error_reply``), and what comes next.

    ``reply``: write the error (False when the command said ``noreply``, or memcached closes silently).
    ``close``: close the connection after the reply. ``then``: a command to run without reply (a
    ``set`` whose value is too large deletes the key's stale value, as memcached does).
    """

    error: DomainError
    reply: bool = True
    close: bool = False
    then: Command | None = None


_UNKNOWN = FailedRequest(UnknownCommand())
_SILENT_CLOSE = FailedRequest(BadCommand("line too long or not memcached"), reply=False, close=True)


# -- numbers, read as memcached's C parsers read them ----------------------------------------------


def _c_number(token: bytes) -> tuple[bool, int] | None:
    """``strtoul``'s syntax as memcached's ``safe_*`` checks it: (negative, magnitude), or None."""
    i = 0
    n = len(token)
    while i < n and token[i] in _BLANKS:
        i += 1
    negative = False
    if i < n and token[i] in b"+-":
        negative = token[i] == 0x2D
        i += 1
    start = i
    while i < n and 0x30 <= token[i] <= 0x39:
        i += 1
    if i == start or (i < n and token[i] not in _BLANKS):
        return None
    return negative, int(token[start:i])


def _strtoull(token: bytes) -> int | None:
    """memcached's ``safe_strtoull``: an unsigned 64-bit number, or None."""
    if token.isdigit():
        value = int(token)
        return value if value <= _MAX_U64 else None
    parsed = _c_number(token)
    if parsed is None or parsed[1] > _MAX_U64:
        return None
    value = -parsed[1] & _MAX_U64 if parsed[0] else parsed[1]
    if value > _MAX_U64 >> 1 and b"-" in token:
        return None
    return value


def _strtoul32(token: bytes) -> int | None:
    """memcached's ``safe_strtoul`` into a ``uint32_t`` (64-bit ``unsigned long``, low 32 bits kept)."""
    value = _strtoull(token)
    return None if value is None else value & 0xFFFFFFFF


def _strtol32(token: bytes) -> int | None:
    """memcached's ``safe_strtol`` into an ``int32_t`` (64-bit ``long``, low 32 bits kept, signed)."""
    if token.isdigit():
        value = int(token)
        if value > _MAX_U64 >> 1:
            return None
    else:
        parsed = _c_number(token)
        if parsed is None:
            return None
        value = -parsed[1] if parsed[0] else parsed[1]
        if not -(1 << 63) <= value < 1 << 63:
            return None
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value > _INT_MAX else value


def _digits(token: bytes) -> int:
    """A plain decimal number of the extension's grammar; raises ``BadCommand``."""
    if not token.isdigit() or len(token) > 20:
        raise BadCommand()
    return int(token)


# -- the server's parser ----------------------------------------------------------------------------

_LINE, _DATA, _SWALLOW, _DEAD, _BINARY = range(5)

_Build = Callable[[bytes], Command]
#: What a line parser returns: a command, a rejection, or a data block to read (bytes, noreply, build).
_Parsed = Command | FailedRequest | tuple[int, bool, _Build]


def _plain_get_key(buf: bytes, start: int, end: int) -> bytes | None:
    """The key when ``buf[start:end]``, a line without its line end, is a plain get: ``get``, one space and
    one key of 1-250 bytes without space or NUL (the most common request); None for any other line."""
    if buf.startswith(b"get ", start):
        key = buf[start + 4 : end]
        if 0 < len(key) <= MAX_KEY_LENGTH and b" " not in key and b"\0" not in key:
            return key
    return None


class RequestParser:
    """memcached's request framing and parsing, fed bytes: ``feed(data)``, then ``next()`` until None.

    ``next()`` returns a command, a ``FailedRequest``, or None when it needs more bytes. After a ``FailedRequest``
    with ``close`` (and after ``Quit``) it returns None for ever. Memory is bounded: a line by
    ``max_line`` (or the longest get line of ``max_keys`` keys), a data block by ``max_value_size`` + 2
    (a larger one is skipped as it arrives, never held).

    With ``plain_gets``, a ``get`` of one plain key comes back as the key itself (``bytes``), not as a
    ``Get``, and ``plain_get(data)`` takes a read that is just such a line: a server whose backend can read
    one key directly answers the most common request without building a command and a result
    (``plain_get_reply``).
    """

    __slots__ = (
        "_buf",
        "_build",
        "_dispatch",
        "_fence",
        "_lease",
        "_fresh",
        "_more",
        "_more_len",
        "_need",
        "_noreply",
        "_plain_gets",
        "_pos",
        "_state",
        "max_get_line",
        "map_epoch",
        "max_keys",
        "max_line",
        "max_value_size",
    )

    def __init__(
        self,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
        max_line: int = DEFAULT_MAX_LINE,
        max_keys: int = DEFAULT_MAX_KEYS,
        plain_gets: bool = False,
    ) -> None:
        self.max_value_size = max_value_size
        #: The cluster map epoch the connection named (``xmap``, set by the server once it ran it): every
        #: ``XApply`` parsed from then on carries it (``XApply.epoch``), at no cost to the other commands.
        self.map_epoch = 0
        # The epoch of the ``xfence`` parsed last, for the next ``xput`` (``XPut.epoch``); 0: none pending.
        self._fence = 0
        # The lease of the ``xdeadline`` parsed last, for the next ``xapply`` or ``xput``; None: none pending.
        self._lease: Lease | None = None
        self._plain_gets = plain_gets
        self.max_line = max_line
        self.max_keys = max_keys
        self.max_get_line = max(max_line, 8 + max_keys * (MAX_KEY_LENGTH + 1))
        self._buf = b""
        self._pos = 0
        self._more: list[bytes] = []  # bytes fed while a long data block is incomplete
        self._more_len = 0
        self._state = _LINE
        self._need = 0
        self._noreply = False
        self._build: _Build | None = None
        self._fresh = True
        self._dispatch: dict[bytes, Callable[[list[bytes], int], _Parsed]] = {
            b"get": self._get,
            b"gets": self._gets,
            b"bget": self._get,
            b"gat": self._gat,
            b"gats": self._gats,
            b"set": self._set,
            b"add": self._add,
            b"replace": self._replace,
            b"append": self._append,
            b"prepend": self._prepend,
            b"cas": self._cas,
            b"delete": self._delete,
            b"incr": self._incr,
            b"decr": self._decr,
            b"touch": self._touch,
            b"flush_all": self._flush_all,
            b"stats": self._stats,
            b"version": self._version,
            b"verbosity": self._verbosity,
            b"quit": self._quit,
            b"cache_memlimit": self._cache_memlimit,
            b"shutdown": self._shutdown,
            b"lru_crawler": self._lru_crawler,
            b"mg": self._mg,
            b"ms": self._ms,
            b"md": self._md,
            b"ma": self._ma,
            b"mn": self._mn,
            b"me": self._me,
            b"xget": self._xget,
            b"xver": self._xver,
            b"xput": self._xput,
            b"xmove": self._xput,
            b"xapply": self._xapply,
            b"xauth": self._xauth,
            b"xbulk": self._xbulk,
            b"xdigest": self._xdigest,
            b"xlist": self._xlist,
            b"xepoch": self._xepoch,
            b"xmap": self._xmap,
            b"xfence": self._xfence,
            b"xlease": self._xlease,
            b"xdeadline": self._xdeadline,
            b"xrelease": self._xrelease,
        }

    def feed(self, data: bytes) -> None:
        """Add bytes read from the connection."""
        if self._fresh and data:
            self._fresh = False
            if data[0] == 0x80:  # the binary protocol's magic byte: memcached decides on the first byte
                self._state = _BINARY
        if self._pos >= len(self._buf):
            self._buf = data
            self._pos = 0
        elif self._state == _DATA and len(self._buf) - self._pos < self._need:
            self._more.append(data)  # a long data block: joined once, by ``next``, into the block alone
            self._more_len += len(data)
        else:
            if self._more:
                data = b"".join(self._more) + data
                self._more.clear()
                self._more_len = 0
            self._buf = self._buf[self._pos :] + data
            self._pos = 0

    def plain_get(self, data: bytes) -> bytes | None:
        """With ``plain_gets``, when nothing is buffered and ``data`` is exactly one plain get line, its key:
        the caller answers it and feeds nothing (a client with one request in flight sends one line per
        read). Else None, and ``data`` is fed as usual."""
        if not self._plain_gets or self._state != _LINE or self._pos < len(self._buf):
            return None
        end = len(data) - 1
        if end < 0 or data[end] != 0x0A:  # not a whole line
            return None
        if end > 0 and data[end - 1] == 0x0D:
            end -= 1
        key = _plain_get_key(data, 0, end)
        if key is None or b"\n" in key:  # not a plain get, or not one line
            return None
        self._fresh = False
        return key

    @property
    def buffered(self) -> int:
        """Bytes received and not parsed yet."""
        return len(self._buf) - self._pos + self._more_len

    @property
    def in_request(self) -> bool:
        """True while a command is half-received: bytes not parsed yet, or a data block (read or skipped)
        not all here."""
        return self._state in (_DATA, _SWALLOW) or len(self._buf) > self._pos or self._more_len > 0

    def next(self) -> Command | FailedRequest | bytes | None:
        """The next command or rejection (or, with ``plain_gets``, the key of a plain get), or None until
        more bytes are fed."""
        if self._pos >= len(self._buf):  # all consumed: nothing to do in any state
            return None
        while True:
            state = self._state
            if state == _LINE:
                buf = self._buf
                pos = self._pos
                end = buf.find(b"\n", pos)
                if end < 0:
                    return self._no_newline()
                if end - pos >= READ_BUFFER and not self._multiget(pos):
                    return self._close(_SILENT_CLOSE)
                self._pos = end + 1
                if end > pos and buf[end - 1] == 0x0D:
                    end -= 1
                key = _plain_get_key(buf, pos, end)
                if key is not None:  # the hot path: a get of one plain key
                    return key if self._plain_gets else Get((key,))
                parsed = self._line(buf[pos:end])
                if type(parsed) is tuple:
                    self._need, self._noreply, self._build = parsed
                    self._state = _DATA
                    continue
                if type(parsed) is FailedRequest and parsed.close or type(parsed) is Quit:
                    self._state = _DEAD
                return parsed  # type: ignore[return-value]  # not a tuple (``type() is tuple`` does not narrow)
            if state == _DATA:
                need = self._need
                pos = self._pos
                if len(self._buf) - pos + self._more_len < need:
                    return None
                if self._more:
                    return self._spanning_block(need)
                buf = self._buf
                self._pos = pos + need
                self._state = _LINE
                build = self._build
                self._build = None
                if buf[pos + need - 2 : pos + need] != b"\r\n":
                    return FailedRequest(BadDataChunk(), reply=not self._noreply)
                assert build is not None
                return build(buf[pos : pos + need - 2])
            if state == _BINARY:
                return self._close(FailedRequest(UnknownCommand(), close=True))
            if state == _SWALLOW:
                available = len(self._buf) - self._pos
                if available >= self._need:
                    self._pos += self._need
                    self._state = _LINE
                    continue
                self._need -= available
                self._buf = b""
                self._pos = 0
                return None
            return None

    # -- framing --------------------------------------------------------------------------------

    def _spanning_block(self, need: int) -> Command | FailedRequest:
        """The data block of ``need`` bytes (its ``\r\n`` included) that begins in ``_buf`` and goes on in
        the reads kept in ``_more``, all here: its bytes copied once, straight from the reads into the block
        (a bulk page of 256 KiB arrives in four or five reads of 64 KiB); what follows its end becomes the
        buffer."""
        parts: list[bytes | memoryview] = [memoryview(self._buf)[self._pos :], *self._more]
        self._more.clear()
        self._more_len = 0
        size = need - 2  # the block without its line end
        got = 0
        index = 0
        while got + len(parts[index]) < size:  # the bytes before the read the block ends in
            got += len(parts[index])
            index += 1
        last = memoryview(parts[index])
        cut = size - got
        block = b"".join([*parts[:index], last[:cut]])
        rest = [last[cut:], *parts[index + 1 :]]
        self._buf = b"".join(rest)
        self._pos = 2
        self._state = _LINE
        build = self._build
        self._build = None
        if self._buf[:2] != b"\r\n":
            return FailedRequest(BadDataChunk(), reply=not self._noreply)
        assert build is not None
        return build(block)

    def _close(self, failed: FailedRequest) -> FailedRequest:
        self._state = _DEAD
        self._buf = b""
        self._pos = 0
        return failed

    def _multiget(self, pos: int) -> bool:
        """memcached lets a line grow past the limit when it is a get/gets after at most 100 spaces; so do
        we for the extension's ``xget`` (a gateway's read of many keys), under the same ``max_keys``."""
        head = self._buf[pos : pos + 106]
        stripped = head.lstrip(b" ")
        return len(head) - len(stripped) <= 100 and (stripped.startswith((b"get ", b"gets ", b"xget ")))

    def _no_newline(self) -> FailedRequest | None:
        pending = len(self._buf) - self._pos
        if pending > self.max_line:
            if not self._multiget(self._pos):
                return self._close(_SILENT_CLOSE)
            if pending > self.max_get_line:
                return self._close(FailedRequest(ServiceUnavailable(_OUT_OF_MEMORY), close=True))
        return None

    def _line(self, line: bytes) -> _Parsed:
        if b"\0" in line:  # memcached reads the line as a C string
            line = line[: line.index(b"\0")]
        tokens = line.split(b" ")
        if b"" in tokens:
            tokens = [t for t in tokens if t]
        if not tokens or len(tokens[0]) < 2:
            return _UNKNOWN
        handler = self._dispatch.get(tokens[0])
        ntokens = len(tokens) + 1 if len(tokens) < _MAX_TOKENS - 1 else _MAX_TOKENS
        if handler is None:
            # memcached answers ERROR in its branches for names starting with these letters (and the
            # two-letter meta commands); elsewhere a line ending in an HTTP version closes silently.
            name = tokens[0]
            memcached_branch = name[0] in b"gsacidt" or (name[0] == 0x6D and len(name) == 2)
            if not memcached_branch and tokens[ntokens - 2].startswith(b"HTTP/"):
                return self._close(_SILENT_CLOSE)
            return _UNKNOWN
        return handler(tokens, ntokens)

    # -- retrieval -------------------------------------------------------------------------------

    def _keys(self, keys: list[bytes]) -> tuple[bytes, ...] | FailedRequest:
        for key in keys:
            if len(key) > MAX_KEY_LENGTH:
                return FailedRequest(BadCommand())
        if len(keys) > self.max_keys:
            return FailedRequest(BadCommand(f"too many keys in one request (the limit is {self.max_keys})"))
        return tuple(keys)

    def _get(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        if ntokens < 3:
            return _UNKNOWN
        keys = self._keys(tokens[1:])
        return keys if type(keys) is FailedRequest else Get(keys)

    def _gets(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        if ntokens < 3:
            return _UNKNOWN
        keys = self._keys(tokens[1:])
        return keys if type(keys) is FailedRequest else Get(keys, True)

    def _touching(self, tokens: list[bytes], ntokens: int, cas: bool) -> _Parsed:
        if ntokens < 3:
            return _UNKNOWN
        exptime = _strtol32(tokens[1])
        if exptime is None:
            return FailedRequest(BadCommand(_BAD_EXPTIME))
        keys = self._keys(tokens[2:])
        return keys if type(keys) is FailedRequest else Get(keys, cas, exptime)

    def _gat(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        return self._touching(tokens, ntokens, False)

    def _gats(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        return self._touching(tokens, ntokens, True)

    # -- storage ---------------------------------------------------------------------------------

    def _update(self, tokens: list[bytes], ntokens: int, mode: StoreMode) -> _Parsed:
        """memcached's ``process_update_command``, in its order of checks."""
        if mode == "cas":
            if ntokens not in (7, 8):
                return _UNKNOWN
        elif ntokens not in (6, 7):
            return _UNKNOWN
        noreply = tokens[ntokens - 2] == b"noreply"
        key = tokens[1]
        if len(key) > MAX_KEY_LENGTH:
            return FailedRequest(BadCommand(), reply=not noreply)
        flags = _strtoul32(tokens[2])
        exptime = _strtol32(tokens[3])
        size = _strtol32(tokens[4])
        if flags is None or exptime is None or size is None:
            return FailedRequest(BadCommand(), reply=not noreply)
        cas: int | None = None
        if mode == "cas":
            cas = _strtoull(tokens[5])
            if cas is None:
                return FailedRequest(BadCommand(), reply=not noreply)
        if size < 0 or size > _INT_MAX - 2:
            return FailedRequest(BadCommand(), reply=not noreply)
        if size > self.max_value_size:
            return self._too_large(size, noreply, Delete(key, True) if mode == "set" else None)

        def build(value: bytes) -> Command:
            return Store(mode, key, flags, exptime, value, cas, noreply)

        return size + 2, noreply, build

    def _too_large(self, size: int, noreply: bool, then: Command | None = None) -> FailedRequest:
        failed = FailedRequest(ValueTooLarge(size, self.max_value_size), reply=not noreply, then=then)
        return self._swallow(size, failed)

    def _swallow(self, size: int, failed: FailedRequest) -> FailedRequest:
        """Skip the ``size`` bytes (and CRLF) of a refused command's data block; ``failed`` says why."""
        self._state = _SWALLOW
        self._need = size + 2
        return failed

    def _set(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        if ntokens == 6 and len(tokens[1]) <= MAX_KEY_LENGTH:  # the hot path: plain numbers
            flags, exptime, size = tokens[2], tokens[3], tokens[4]
            if flags.isdigit() and exptime.isdigit() and size.isdigit() and len(size) < 10:
                length = int(size)
                if length <= self.max_value_size and len(flags) < 10 and len(exptime) < 10:
                    key = tokens[1]
                    flag_value = int(flags)
                    expiry = int(exptime)

                    def build(value: bytes) -> Command:
                        return Store("set", key, flag_value, expiry, value)

                    return length + 2, False, build
        return self._update(tokens, ntokens, "set")

    def _add(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        return self._update(tokens, ntokens, "add")

    def _replace(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        return self._update(tokens, ntokens, "replace")

    def _append(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        return self._update(tokens, ntokens, "append")

    def _prepend(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        return self._update(tokens, ntokens, "prepend")

    def _cas(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        return self._update(tokens, ntokens, "cas")

    # -- other writes ----------------------------------------------------------------------------

    def _delete(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        if not 3 <= ntokens <= 5:
            return _UNKNOWN
        noreply = False
        if ntokens > 3:
            hold_is_zero = tokens[2] == b"0"
            noreply = tokens[ntokens - 2] == b"noreply"
            if not (ntokens == 4 and (hold_is_zero or noreply) or ntokens == 5 and hold_is_zero and noreply):
                return FailedRequest(BadCommand(_BAD_DELETE), reply=not noreply)
        if len(tokens[1]) > MAX_KEY_LENGTH:
            return FailedRequest(BadCommand(), reply=not noreply)
        return Delete(tokens[1], noreply)

    def _arith(self, tokens: list[bytes], ntokens: int, incr: bool) -> _Parsed:
        if ntokens not in (4, 5):
            return _UNKNOWN
        noreply = tokens[ntokens - 2] == b"noreply"
        if len(tokens[1]) > MAX_KEY_LENGTH:
            return FailedRequest(BadCommand(), reply=not noreply)
        delta = _strtoull(tokens[2])
        if delta is None:
            return FailedRequest(BadCommand(_BAD_DELTA), reply=not noreply)
        return Arith(tokens[1], delta, incr, noreply)

    def _incr(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        return self._arith(tokens, ntokens, True)

    def _decr(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        return self._arith(tokens, ntokens, False)

    def _touch(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        if ntokens not in (4, 5):
            return _UNKNOWN
        noreply = tokens[ntokens - 2] == b"noreply"
        if len(tokens[1]) > MAX_KEY_LENGTH:
            return FailedRequest(BadCommand(), reply=not noreply)
        exptime = _strtol32(tokens[2])
        if exptime is None:
            return FailedRequest(BadCommand(_BAD_EXPTIME), reply=not noreply)
        return Touch(tokens[1], exptime, noreply)

    # -- the rest ---------------------------------------------------------------------------------

    def _flush_all(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        if not 2 <= ntokens <= 4:
            return _UNKNOWN
        noreply = tokens[ntokens - 2] == b"noreply"
        delay = 0
        if ntokens != (3 if noreply else 2):
            parsed = _strtol32(tokens[1])
            if parsed is None:
                return FailedRequest(BadCommand(_BAD_EXPTIME), reply=not noreply)
            delay = parsed
        return FlushAll(delay, noreply)

    def _stats(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        return StatsCommand(b" ".join(tokens[1:]).decode("latin-1"))

    def _version(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        return VersionCommand()

    def _verbosity(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        if ntokens not in (3, 4):
            return _UNKNOWN
        noreply = tokens[ntokens - 2] == b"noreply"
        level = _strtoul32(tokens[1])
        if level is None:
            return FailedRequest(BadCommand(), reply=not noreply)
        return Verbosity(level, noreply)

    def _quit(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        return Quit()

    def _cache_memlimit(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        if ntokens not in (3, 4):
            return _UNKNOWN
        mib = _strtoul32(tokens[1])
        if mib is None:
            return _UNKNOWN  # memcached answers ERROR to a limit it cannot read
        return CacheMemlimit(mib, tokens[ntokens - 2] == b"noreply")

    def _lru_crawler(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        """memcached's ``process_lru_crawler_command``, with no crawler to set: its settings answer OK."""
        action = tokens[1] if ntokens > 2 else b""
        if ntokens == 4 and action in (b"metadump", b"crawl"):
            classes = _slab_classes(tokens[2], action == b"metadump")
            if classes is None:
                return LruCrawler("bad class")
            return LruCrawler("metadump", 1 in classes) if action == b"metadump" else LruCrawler("ok")
        if ntokens == 4 and action in (b"sleep", b"tocrawl"):
            number = _strtoull(tokens[2])
            if number is None or number > 0xFFFFFFFF:
                return FailedRequest(BadCommand())
            if action == b"sleep" and number > 1_000_000:
                return FailedRequest(BadCommand("sleep must be one second or less"))
            return LruCrawler("ok")
        if ntokens == 3 and action in (b"enable", b"disable"):
            return LruCrawler("ok")
        return _UNKNOWN

    def _shutdown(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        if ntokens == 2:
            return Shutdown()
        return Shutdown("graceful" if ntokens == 3 and tokens[1] == b"graceful" else "invalid")

    # -- meta commands (chashd.memcache.meta runs them) -------------------------------------------------

    def _meta_options(self, tokens: list[bytes], start: int) -> tuple[dict[str, Any], str | None]:
        """memcached's ``_meta_flag_preparse``: the options the flag tokens from ``start`` give, and the error
        text when one is bad (a repeated or unknown flag ends the parse at once; a bad number is noted and
        the parse goes on, the last message winning, as memcached does)."""
        options: dict[str, Any] = {}
        seen: set[int] = set()
        error: str | None = None
        failed = False
        for token in tokens[start:]:
            flag = token[0]
            if flag >= 127 or flag in seen:
                return options, "duplicate flag"
            seen.add(flag)
            name = chr(flag)
            argument = token[1:]
            if name in "NTR":
                number = _strtol32(argument)
                if number is None:
                    error, failed = "bad token in command line format", True
                else:
                    options[name] = number
            elif name == "F":
                flags = _strtoul32(argument)
                if flags is None:
                    failed = True
                else:
                    options[name] = flags
            elif name in "CJD":
                big = _strtoull(argument)
                if big is None:
                    error, failed = _META_NUMBER_ERRORS[name], True
                else:
                    options[name] = big
            elif name == "M":
                if len(token) != 2:
                    error, failed = "incorrect length for M token", True
                else:
                    options[name] = chr(token[1])
            elif name == "b":
                return options, "base64 keys (flag b) are not supported"
            elif name in "lhOPLkstcfvuqI":
                options[name] = True
            else:
                return options, "invalid flag"
        return options, (error or "bad command line format") if failed else None

    def _meta_head(self, tokens: list[bytes], ntokens: int, too_many: str) -> FailedRequest | None:
        """The checks every meta command with a key makes first, in memcached's order."""
        if ntokens < 3:
            return _UNKNOWN
        if len(tokens[1]) > MAX_KEY_LENGTH:
            return FailedRequest(BadCommand())
        if ntokens > _META_MAX_TOKENS:
            return FailedRequest(BadCommand(too_many))
        return None

    def _mg(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        refused = self._meta_head(tokens, ntokens, "options flags are too long")
        if refused is not None:
            return refused
        options, error = self._meta_options(tokens, 2)
        if error is not None:
            return FailedRequest(BadCommand(error))
        if "h" in options or "l" in options:
            return FailedRequest(BadCommand("flags h and l (hit before, last access) are not supported"))
        return MetaCommand(
            "mg", tokens[1], tuple(tokens[2:]), noreply="q" in options, ttl=options.get("T"),
            vivify=options.get("N"), recache=options.get("R"),
        )  # fmt: skip

    def _ms(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        refused = self._meta_head(tokens, ntokens, "options flags too long")
        if refused is None and ntokens == 3:
            refused = FailedRequest(BadCommand())
        if refused is not None:
            return refused
        size = _strtol32(tokens[2])
        if size is None or size < 0 or size > _INT_MAX - 2:
            return FailedRequest(BadCommand())
        key = tokens[1]
        options, error = self._meta_options(tokens, 3)
        if error is None and any(t[0] == 0x4F and len(t) > MAX_OPAQUE for t in tokens[3:]):
            error = "opaque token too long"
        mode = options.get("M", "")
        if error is None and mode not in _MS_MODES:
            error = "invalid mode for ms M token"
        if error is not None:  # the data block is skipped, as memcached does
            return self._swallow(size, FailedRequest(BadCommand(error)))
        if size > self.max_value_size:  # memcached drops the key's old value, whatever the mode
            return self._too_large(size, False, Delete(key, True))
        flags = tuple(tokens[3:])

        def build(value: bytes) -> Command:
            return MetaCommand(
                "ms", key, flags, value, "q" in options, mode, options.get("T"), client_flags=options.get("F", 0),
                cas=options.get("C"), invalidate="I" in options,
            )  # fmt: skip

        return size + 2, False, build

    def _write_options(self, tokens: list[bytes], ntokens: int) -> dict[str, Any] | FailedRequest:
        """The options of an ``md`` or ``ma``, or why the line is refused (memcached words every bad flag of
        these two the same way)."""
        refused = self._meta_head(tokens, ntokens, "options flags too long")
        if refused is not None:
            return refused
        options, error = self._meta_options(tokens, 2)
        if error is not None:
            return FailedRequest(BadCommand(error if error.startswith("base64") else "invalid or duplicate flag"))
        return options

    def _md(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        options = self._write_options(tokens, ntokens)
        if isinstance(options, FailedRequest):
            return options
        return MetaCommand(
            "md", tokens[1], tuple(tokens[2:]), noreply="q" in options, ttl=options.get("T"), cas=options.get("C"),
            invalidate="I" in options,
        )  # fmt: skip

    def _ma(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        options = self._write_options(tokens, ntokens)
        if isinstance(options, FailedRequest):
            return options
        mode = options.get("M", "")
        if mode not in _MA_MODES:
            return FailedRequest(BadCommand("invalid mode for ma M token"))
        return MetaCommand(
            "ma", tokens[1], tuple(tokens[2:]), noreply="q" in options, mode=mode, ttl=options.get("T"),
            vivify=options.get("N"), cas=options.get("C"), delta=options.get("D", 1), initial=options.get("J", 0),
        )  # fmt: skip

    def _mn(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        return MetaCommand("mn")

    def _me(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        if ntokens < 3 or len(tokens[1]) > MAX_KEY_LENGTH:
            return FailedRequest(BadCommand())
        if ntokens >= 4 and tokens[2] == b"b":
            return FailedRequest(BadCommand("base64 keys (flag b) are not supported"))
        return MetaCommand("me", tokens[1])

    # -- the versioned extension ------------------------------------------------------------------

    def _xget(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        if ntokens < 3:
            return _UNKNOWN
        keys = self._keys(tokens[1:])
        return keys if type(keys) is FailedRequest else XGet(keys)

    def _xver(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        if ntokens != 3:
            return _UNKNOWN
        if len(tokens[1]) > MAX_KEY_LENGTH:
            return FailedRequest(BadCommand())
        return XVer(tokens[1])

    def _xput(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        handoff = tokens[0] == b"xmove"
        epoch = 0
        lease = None
        if not handoff:  # the copy of a read-modify-write's result (``xfence``, ``xdeadline`` just before)
            if self._fence:
                epoch, self._fence = self._fence, 0
            if self._lease is not None:
                lease, self._lease = self._lease, None
        if len(tokens) not in (7, 8) or len(tokens) == 8 and tokens[7] != b"noreply":
            return FailedRequest(BadCommand())
        noreply = len(tokens) == 8
        key = tokens[1]
        try:
            if len(key) > MAX_KEY_LENGTH:
                raise BadCommand()
            flags = _digits(tokens[2])
            expires_at = _digits(tokens[3])
            version = _version_token(tokens[4])
            if tokens[5] not in (b"0", b"1") or flags > MAX_FLAGS or expires_at > MAX_EXPIRES_AT:
                raise BadCommand()
            tombstone = tokens[5] == b"1"
            size = _digits(tokens[6])
        except BadCommand as e:
            return FailedRequest(e, reply=not noreply)
        if size > self.max_value_size:
            return self._too_large(size, noreply)

        def build(value: bytes) -> Command:
            return XPut(key, Record(value, flags, expires_at, version, tombstone), noreply, handoff, epoch, lease)

        return size + 2, noreply, build

    def _xauth(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        if ntokens != 3:
            return FailedRequest(BadCommand())
        return XAuth(tokens[1])

    def _xbulk(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        """``xbulk`` (the probe) or ``xbulk <rows> <bytes>`` and its block: the rows are decoded by the
        backend, which knows its limits. A block past ``BULK_PAGE_LIMIT`` (plus one record of the largest
        value) is skipped unread and refused."""
        if len(tokens) == 1:
            return BulkProbe()
        if len(tokens) != 3:
            return FailedRequest(BadCommand())
        try:
            count = _digits(tokens[1])
            size = _digits(tokens[2])
        except BadCommand as e:
            return FailedRequest(e)
        if size > BULK_PAGE_LIMIT + self.max_value_size + 4096:
            self._state = _SWALLOW
            self._need = size + 2
            return FailedRequest(BadCommand(f"bulk page of {size} bytes too large"))

        def build(block: bytes) -> Command:
            return XBulk(count, block)

        return size + 2, False, build

    def _xdigest(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        if len(tokens) not in (5, 6):
            return FailedRequest(BadCommand())
        try:
            placement, first, last = _range_tokens(tokens)
            parts = _digits(tokens[4])
            if not 1 <= parts <= MAX_DIGEST_PARTS:
                raise BadCommand(f"parts must be 1 to {MAX_DIGEST_PARTS}")
            sender = _node_id_token(tokens[5]) if len(tokens) == 6 else ""
        except BadCommand as e:
            return FailedRequest(e)
        return XDigest(placement, first, last, parts, sender)

    def _xepoch(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        epoch = self._epoch(tokens)
        return epoch if isinstance(epoch, FailedRequest) else XEpoch(epoch)

    def _xmap(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        epoch = self._epoch(tokens)
        return epoch if isinstance(epoch, FailedRequest) else XMap(epoch)

    def _xfence(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        """``xfence <epoch> [<holder> <deadline> <s|x>]``: the next ``xput`` parsed carries that epoch
        (``XPut.epoch``), and the lease when given (as ``xdeadline`` would stamp it: one line for both on the
        common path), whatever comes between; a bad line leaves none pending."""
        lease: Lease | FailedRequest | None = None
        if len(tokens) == 5:
            lease = _lease_tokens(tokens[2:])
            tokens = tokens[:2]
        epoch = self._epoch(tokens)
        if isinstance(epoch, FailedRequest) or isinstance(lease, FailedRequest):
            self._fence = 0
            self._lease = None
            return epoch if isinstance(epoch, FailedRequest) else cast(FailedRequest, lease)
        self._fence = epoch
        if lease is not None:
            self._lease = lease
        return XFence(epoch)

    def _xlease(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        """``xlease <key> <holder> <deadline> <s|x>``: an ``xget`` of one key that leases it."""
        if len(tokens) != 5 or len(tokens[1]) > MAX_KEY_LENGTH:
            return FailedRequest(BadCommand())
        lease = _lease_tokens(tokens[2:])
        return lease if isinstance(lease, FailedRequest) else XLease(tokens[1], lease, self.map_epoch)

    def _xdeadline(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        """``xdeadline <holder> <deadline> <s|x>``: the next ``xapply`` or ``xput`` parsed carries that lease
        (``XApply.lease``, ``XPut.lease``), whatever comes between; a bad line leaves none pending."""
        lease = _lease_tokens(tokens[1:]) if len(tokens) == 4 else FailedRequest(BadCommand())
        if isinstance(lease, FailedRequest):
            self._lease = None
            return lease
        self._lease = lease
        return XDeadline(lease)

    def _xrelease(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        """``xrelease <key> <holder> <deadline> [<floor>]``: that read-modify-write's lease on the key (of the
        round of that deadline or an earlier one) ends, at once, or twice the clock bound after ``<floor>``
        (Unix milliseconds)."""
        if len(tokens) not in (4, 5) or len(tokens[1]) > MAX_KEY_LENGTH or not _HOLDER.fullmatch(tokens[2]):
            return FailedRequest(BadCommand())
        try:
            numbers = [_digits(token) for token in tokens[3:]]
        except BadCommand as e:
            return FailedRequest(e)
        if max(numbers) > _MAX_U64 >> 1:
            return FailedRequest(BadCommand("a deadline or floor is at most 63 bits"))
        return XRelease(tokens[1], tokens[2].decode("ascii"), *numbers)

    @staticmethod
    def _epoch(tokens: list[bytes]) -> int | FailedRequest:
        """The epoch of ``<verb> <epoch>`` (63 bits at most), or the request's failure."""
        if len(tokens) != 2:
            return FailedRequest(BadCommand())
        try:
            epoch = _digits(tokens[1])
        except BadCommand as e:
            return FailedRequest(e)
        if epoch > _MAX_U64 >> 1:
            return FailedRequest(BadCommand("an epoch is at most 63 bits"))
        return epoch

    def _xlist(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        if len(tokens) not in (5, 7):
            return FailedRequest(BadCommand())
        try:
            placement, first, last = _range_tokens(tokens)
            limit = _digits(tokens[4])
            if not 1 <= limit <= MAX_LIST_LIMIT:
                raise BadCommand(f"limit must be 1 to {MAX_LIST_LIMIT}")
            after = None
            if len(tokens) == 7:
                if len(tokens[6]) > MAX_KEY_LENGTH:
                    raise BadCommand()
                after = (_hash_token(tokens[5]), tokens[6])
        except BadCommand as e:
            return FailedRequest(e)
        return XList(placement, first, last, limit, after)

    def _xapply(self, tokens: list[bytes], ntokens: int) -> _Parsed:
        lease: Lease | None
        lease, self._lease = self._lease, None  # an xdeadline's, for this xapply whatever becomes of it
        if len(tokens) < 3:
            return FailedRequest(BadCommand())
        try:
            version = _version_token(tokens[1])
        except BadCommand as e:
            return FailedRequest(e)
        inner = tokens[2:]
        handler = self._writes.get(inner[0])
        if handler is None:
            return _UNKNOWN
        extension: dict[str, int] = {}
        if len(inner) > 2 and inner[-1].startswith(b"~"):  # what a meta command adds (a compared cas, ...)
            try:
                extension, inline = _extension(inner.pop())
            except BadCommand as e:
                return FailedRequest(e)
            if inline is not None:  # the command's lease, in the token (a gateway that knows this kvstore's)
                lease = inline
        parsed = handler(self, inner, len(inner) + 1 if len(inner) < _MAX_TOKENS - 1 else _MAX_TOKENS)
        if type(parsed) is FailedRequest:
            return replace(parsed, reply=True, then=None)
        epoch = self.map_epoch
        if type(parsed) is tuple:
            size, _, build = parsed

            def build_applied(value: bytes) -> Command:
                # the builders of self._writes make write commands only
                return XApply(version, _replied(build(value), extension), epoch, lease)  # type: ignore[arg-type]  # a write, as said above

            return size, False, build_applied
        return XApply(version, _replied(parsed, extension), epoch, lease)  # type: ignore[arg-type]  # a write command, as above

    _writes: dict[bytes, Callable[[RequestParser, list[bytes], int], _Parsed]] = {
        b"set": _set,
        b"add": _add,
        b"replace": _replace,
        b"append": _append,
        b"prepend": _prepend,
        b"cas": _cas,
        b"delete": _delete,
        b"incr": _incr,
        b"decr": _decr,
        b"touch": _touch,
    }


#: memcached's MAX_NUMBER_OF_SLAB_CLASSES: class ids run from 1 to this - 1.
_SLAB_CLASSES = 64


def _slab_classes(token: bytes, dump: bool) -> frozenset[int] | None:
    """The class ids of an ``lru_crawler`` argument (``all``, for a metadump also ``hash``, or ids separated
    by commas), or None when one is not a class id."""
    if token == b"all" or (dump and token == b"hash"):
        return frozenset(range(1, _SLAB_CLASSES))
    classes = set()
    for part in token.split(b","):
        number = _strtoull(part)
        if number is None or not 0 < number < _SLAB_CLASSES:
            return None
        classes.add(number)
    return frozenset(classes)


def _replied(command: WriteCommand, extension: dict[str, int] | None = None) -> WriteCommand:
    """The command with ``noreply`` cleared (an ``xapply`` always replies) and the extension's fields set."""
    if extension:
        command = replace(command, **extension)  # type: ignore[arg-type]
    return replace(command, noreply=False) if command.noreply else command


#: Sub-ranges one ``xdigest`` may ask for, and records one ``xlist`` may return.
MAX_DIGEST_PARTS = MAX_PARTS
MAX_LIST_LIMIT = 10000
_PLACEMENT_DIGITS = frozenset(b"0123456789abcdef")


def _hash_token(token: bytes) -> int:
    value = _digits(token)
    if value > MAX_HASH:
        raise BadCommand("a ring hash is 32 bits")
    return value


def _range_tokens(tokens: list[bytes]) -> tuple[str, int, int]:
    """``<placement> <first> <last>`` of an anti-entropy command; raises ``BadCommand``."""
    placement = tokens[1]
    if not 0 < len(placement) <= 64 or not _PLACEMENT_DIGITS.issuperset(placement):
        raise BadCommand("a placement id is 1 to 64 lowercase hex digits")
    first, last = _hash_token(tokens[2]), _hash_token(tokens[3])
    if last < first:
        raise BadCommand("the range ends before it starts")
    return placement.decode("ascii"), first, last


def _node_id_token(token: bytes) -> str:
    """A node id (what a version's writer may be); raises ``BadCommand``."""
    try:
        return Version.parse("0-" + token.decode("ascii")).writer
    except (UnicodeDecodeError, ValueError):
        raise BadCommand("bad node id") from None


#: The fields of the xapply extension token (``~C<cas>,T<exptime>,N<exptime>,J<initial>``), by letter.
_EXTENSION_FIELDS = {"C": "cas_unique", "T": "exptime", "N": "vivify", "J": "initial"}


#: The lease field of an xapply extension token: ``L<deadline><s|x><holder>``.
_LEASE_FIELD = re.compile(rb"L([0-9]{1,19})([sx])([A-Za-z0-9._:-]{1,100})")


def _extension(token: bytes) -> tuple[dict[str, int], Lease | None]:
    """The fields of an xapply extension token, and the lease it names (``L``) if any; ``BadCommand`` for one
    that does not parse."""
    fields: dict[str, int] = {}
    lease = None
    for part in token[1:].split(b","):
        if part[:1] == b"L":
            match = _LEASE_FIELD.fullmatch(part)
            if match is None or lease is not None or int(match[1]) > _MAX_U64 >> 1:
                raise BadCommand("bad xapply extension")
            lease = Lease(match[3].decode("ascii"), int(match[1]), match[2] == b"x")
            continue
        name = _EXTENSION_FIELDS.get(part[:1].decode("latin-1"))
        digits = part[1:]
        if name is None or not digits.lstrip(b"-").isdigit() or len(digits) > 21:
            raise BadCommand("bad xapply extension")
        fields[name] = int(digits)
    return fields, lease


def _extension_token(command: WriteCommand, lease: Lease | None = None) -> bytes:
    """`` ~C..,T..`` for what a meta command set on ``command`` (a compared cas, an incr's TTL or creation)
    and the command's ``lease`` (``L``), or b"" for neither."""
    parts = []
    if lease is not None:
        parts.append(b"L%d%s%s" % (lease.deadline, b"x" if lease.exclusive else b"s", lease.holder.encode()))
    cas = getattr(command, "cas_unique", None)
    if cas is not None and (type(command) is not Store or command.mode in ("append", "prepend")):
        parts.append(b"C%d" % cas)  # a cas store carries its cas in its own line
    if type(command) is Arith:
        if command.exptime is not None:
            parts.append(b"T%d" % command.exptime)
        if command.vivify is not None:
            parts.append(b"N%d" % command.vivify)
            parts.append(b"J%d" % command.initial)
    return b" ~" + b",".join(parts) if parts else b""


#: A lease's holder: a gateway's id, ``:`` and a number (``Router``), at most 100 bytes.
_HOLDER = re.compile(rb"[A-Za-z0-9._:-]{1,100}")


def _lease_tokens(tokens: list[bytes]) -> Lease | FailedRequest:
    """The ``Lease`` of ``<holder> <deadline> <s|x>`` (``xlease``, ``xdeadline``), or the request's failure."""
    holder, deadline, mode = tokens
    if not _HOLDER.fullmatch(holder) or mode not in (b"s", b"x"):
        return FailedRequest(BadCommand())
    try:
        when = _digits(deadline)
    except BadCommand as e:
        return FailedRequest(e)
    if when > _MAX_U64 >> 1:
        return FailedRequest(BadCommand("a deadline is at most 63 bits"))
    return Lease(holder.decode("ascii"), when, mode == b"x")


def fence_line(epoch: int, lease: Lease) -> bytes:
    """``xfence <epoch> <holder> <deadline> <s|x>``: the fence and lease of a copy in one line (for a kvstore
    known to take leases)."""
    mode = b"x" if lease.exclusive else b"s"
    return b"xfence %d %s %d %s\r\n" % (epoch, lease.holder.encode(), lease.deadline, mode)


def _version_token(token: bytes) -> Version:
    try:  # not parse_version's memo: a request's version is mostly a new one (an XPut's)
        return Version.parse(token.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise BadCommand("bad version") from None


# -- the server's replies ----------------------------------------------------------------------------

_STATUS_LINES = {status: status.value.encode() + b"\r\n" for status in Status}
_END = b"END\r\n"


def error_reply(error: BaseException) -> bytes:
    """The reply line for an error, with memcached's words (the one place errors meet the wire)."""
    if isinstance(error, UnknownCommand):
        return b"ERROR\r\n"
    if isinstance(error, ValueTooLarge):
        return b"SERVER_ERROR object too large for cache\r\n"
    text = str(error).replace("\r", " ").replace("\n", " ").encode("utf-8", "replace")
    if isinstance(error, RequestError):
        return b"CLIENT_ERROR " + text + b"\r\n"
    if isinstance(error, DomainError):
        return b"SERVER_ERROR " + text + b"\r\n"
    return b"SERVER_ERROR internal error\r\n"


_XVALUE = b"XVALUE %s %d %d %s %d %d\r\n%s\r\n"
_XVALUE_END = _XVALUE + _END  # the common xget reply: one record


def _xvalue_fields(key: bytes, r: Record) -> tuple[bytes, int, int, bytes, bool, int, bytes]:
    return key, r.flags, r.expires_at, str(r.version).encode(), r.tombstone, len(r.value), r.value


def _xvalue(key: bytes, record: Record) -> bytes:
    return _XVALUE % _xvalue_fields(key, record)


def _result_line(result: Status | Number) -> bytes:
    if type(result) is Number:
        return b"%d\r\n" % result.value
    return _STATUS_LINES[result]  # type: ignore[index]  # narrowed by the test above


def _values(command: Command, items: tuple[tuple[bytes, Record], ...]) -> bytes:
    if type(command) is XGet:
        return b"".join([*(_xvalue(key, record) for key, record in items), _END])
    if type(command) is Get and command.cas:
        return b"".join(
            [
                *(
                    b"VALUE %s %d %d %d\r\n%s\r\n" % (key, r.flags, len(r.value), r.version.clock, r.value)
                    for key, r in items
                ),
                _END,
            ]
        )
    return b"".join([*(b"VALUE %s %d %d\r\n%s\r\n" % (key, r.flags, len(r.value), r.value) for key, r in items), _END])


def plain_get_reply(key: bytes, found: tuple[int, bytes] | None) -> bytes:
    """The reply to ``get <key>`` of the ``(flags, value)`` found, or of a miss (None)."""
    if found is None:
        return _END
    flags, value = found
    return b"VALUE %s %d %d\r\n%s\r\nEND\r\n" % (key, flags, len(value), value)


def serialize_result(command: Command, result: Result) -> bytes:
    """The reply bytes of ``result``, the answer to ``command``."""
    if type(result) is Values:
        items = result.items
        if not items:
            return _END
        if len(items) == 1:
            kind = type(command)
            # the hot path; ``kind`` holds type(command) once, which mypy does not narrow by
            if kind is Get and not command.cas:  # type: ignore[union-attr]  # a Get, as said above
                key, r = items[0]
                return plain_get_reply(key, (r.flags, r.value))
            if kind is XGet or kind is XLease:  # a gateway's read
                return _XVALUE_END % _xvalue_fields(*items[0])
        return _values(command, items)
    if type(result) is Status:
        return _STATUS_LINES[result]
    if type(result) is VersionOf:  # a gateway's quorum reads, after the first replica
        version = result.version
        return _END if version is None else b"XVER %s\r\n" % str(version).encode()
    if type(result) is Number:
        return b"%d\r\n" % result.value
    if type(result) is XApplied:
        block = b""
        if result.record is not None and type(command) is XApply:
            block = _xvalue(command.command.key, result.record)
        return b"XAPPLIED " + _result_line(result.result) + block + _END
    if type(result) is StatsResult:
        return stats_reply(result.items)
    if type(result) is Bulked:
        return b"XBULKED %d %d\r\n" % (result.stored, result.kept)
    if type(result) is BulkFormat:
        return b"XBULK %d\r\n" % result.version
    if type(result) is Digests:
        return b"".join([*(b"DIGEST %d %d\r\n" % (d.records, d.total) for d in result.items), _END])
    if type(result) is KeyVersions:
        return b"".join([*(b"XKEY %d %s %s\r\n" % (h, k, str(v).encode()) for h, k, v in result.items), _END])
    raise TypeError(f"not a result: {result!r}")


def stats_reply(items: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> bytes:
    """``STAT <name> <value>`` lines and ``END``."""
    return b"".join([*(f"STAT {name} {value}\r\n".encode() for name, value in items), _END])


def version_reply(version: str) -> bytes:
    """``VERSION <version>``."""
    return f"VERSION {version}\r\n".encode()


# -- the client: commands to bytes -----------------------------------------------------------------


def _noreply(command: NoreplyCommand) -> bytes:
    return b" noreply" if command.noreply else b""


def _write_line(command: WriteCommand, noreply: bool, extended: bool = False, lease: Lease | None = None) -> bytes:
    """A write command's line (and data block), without the final ``\\r\\n`` of the line when it has none;
    ``extended`` (inside an ``xapply``) adds the extension token of what a meta command set."""
    tail = b" noreply" if noreply else b""
    if extended:
        tail += _extension_token(command, lease)
    if type(command) is Store:
        cas = b" %d" % (command.cas_unique or 0) if command.mode == "cas" else b""
        return b"%s %s %d %d %d%s%s\r\n%s\r\n" % (
            command.mode.encode(),
            command.key,
            command.flags,
            command.exptime,
            len(command.value),
            cas,
            tail,
            command.value,
        )
    if type(command) is Delete:
        return b"delete %s%s\r\n" % (command.key, tail)
    if type(command) is Arith:
        return b"%s %s %d%s\r\n" % (b"incr" if command.incr else b"decr", command.key, command.delta, tail)
    if type(command) is Touch:
        return b"touch %s %d%s\r\n" % (command.key, command.exptime, tail)
    raise TypeError(f"not a write command: {command!r}")


def serialize_command(command: Command | SplicedGet) -> bytes:
    """The request bytes for ``command``: what ``RequestParser`` parses back into an equal command."""
    if type(command) is SplicedGet:  # the gateway's reads with N=1
        return b"get %s\r\n" % command.key
    if type(command) is XGet:  # the gateway's reads
        keys = command.keys
        return b"xget %s\r\n" % keys[0] if len(keys) == 1 else b"xget " + b" ".join(keys) + b"\r\n"
    if type(command) is XVer:  # the gateway's quorum reads, after the first replica
        return b"xver %s\r\n" % command.key
    if type(command) is XPut:  # the gateway's writes and read repairs, the handoff's moves; its epoch goes as
        # an XFence before it (KVClientProtocol.send)
        r = command.record
        return b"%s %s %d %d %s %d %d%s\r\n%s\r\n" % (
            b"xmove" if command.handoff else b"xput",
            command.key,
            r.flags,
            r.expires_at,
            str(r.version).encode(),
            r.tombstone,
            len(r.value),
            _noreply(command),
            r.value,
        )
    if type(command) is XEpoch:
        return b"xepoch %d\r\n" % command.epoch
    if type(command) is XMap:
        return b"xmap %d\r\n" % command.epoch
    if type(command) is XFence:
        return b"xfence %d\r\n" % command.epoch
    if type(command) is XLease:  # a read-modify-write's reads
        lease = command.lease
        return b"xlease %s %s %d %s\r\n" % (
            command.key,
            lease.holder.encode(),
            lease.deadline,
            b"x" if lease.exclusive else b"s",
        )
    if type(command) is XDeadline:  # before a read-modify-write's xapply or copy (KVClientProtocol.send)
        lease = command.lease
        return b"xdeadline %s %d %s\r\n" % (lease.holder.encode(), lease.deadline, b"x" if lease.exclusive else b"s")
    if type(command) is XRelease:  # a read-modify-write is over (Router)
        floor = b" %d" % command.floor if command.floor else b""
        return b"xrelease %s %s %d%s\r\n" % (command.key, command.holder.encode(), command.deadline, floor)
    if type(command) is XDigest:
        sender = b" " + command.sender.encode() if command.sender else b""
        range_ = (command.placement.encode(), command.first, command.last, command.parts, sender)
        return b"xdigest %s %d %d %d%s\r\n" % range_
    if type(command) is XList:
        after = b"" if command.after is None else b" %d %s" % command.after
        range_ = (command.placement.encode(), command.first, command.last, command.limit, after)
        return b"xlist %s %d %d %d%s\r\n" % range_
    if type(command) is Get:
        joined = b" ".join(command.keys)
        if command.exptime is None:
            return (b"gets " if command.cas else b"get ") + joined + b"\r\n"
        return b"%s %d %s\r\n" % (b"gats" if command.cas else b"gat", command.exptime, joined)
    if isinstance(command, (Store, Delete, Arith, Touch)):
        return _write_line(command, command.noreply)
    if type(command) is XApply:  # its lease in the extension token (KVClientProtocol sends it as an xdeadline
        # before it to a kvstore not known to take leases)
        return b"xapply %s %s" % (
            str(command.version).encode(),
            _write_line(command.command, False, True, command.lease),
        )
    if type(command) is XBulk:
        return b"".join((b"xbulk %d %d\r\n" % (command.count, len(command.block)), command.block, b"\r\n"))
    if type(command) is BulkProbe:
        return b"xbulk\r\n"
    if type(command) is FlushAll:
        return b"flush_all %d%s\r\n" % (command.delay, _noreply(command))
    if type(command) is StatsCommand:
        group = command.group
        return b"stats " + group.encode("latin-1") + b"\r\n" if group else b"stats\r\n"
    if type(command) is VersionCommand:
        return b"version\r\n"
    if type(command) is Verbosity:
        return b"verbosity %d%s\r\n" % (command.level, _noreply(command))
    if type(command) is Quit:
        return b"quit\r\n"
    if type(command) is XAuth:
        return b"xauth %s\r\n" % command.token
    raise TypeError(f"not a command: {command!r}")


# -- the client: reply bytes to results --------------------------------------------------------------

_STATUS_BY_LINE = {status.value.encode(): status for status in Status}
_NO_VALUES = Values(())
_NO_VERSION = VersionOf(None)
_CLIENT_ERRORS: dict[str, type[RequestError]] = {
    str(BadDataChunk()): BadDataChunk,
    str(NonNumericValue()): NonNumericValue,
    Unauthenticated.REQUIRED: Unauthenticated,
    Unauthenticated.FAILED: Unauthenticated,
}
_SERVER_ERRORS: dict[str, type[ServiceUnavailable]] = {str(NodeLeaving()): NodeLeaving}
_STALE = StaleVersion.MESSAGE + ": "


def _digest_line(line: bytes) -> RangeDigest:
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise BadReply(f"bad DIGEST line {line[:60]!r}")
    return RangeDigest(int(parts[1]), int(parts[2]))


def _xkey_line(line: bytes) -> tuple[int, bytes, Version]:
    parts = line.split(b" ")
    try:
        if len(parts) != 4 or not parts[1].isdigit():
            raise ValueError
        return int(parts[1]), parts[2], Version.parse(parts[3].decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise BadReply(f"bad XKEY line {line[:60]!r}") from None


def error_from_reply(line: bytes) -> DomainError | None:
    """The domain error an error line stands for (the inverse of ``error_reply``), or None."""
    if line == b"ERROR":
        return UnknownCommand()
    if line.startswith(b"CLIENT_ERROR "):
        text = line[13:].decode("utf-8", "replace")
        return _CLIENT_ERRORS.get(text, BadCommand)(text)
    if line.startswith(b"SERVER_ERROR "):
        text = line[13:].decode("utf-8", "replace")
        if text == "object too large for cache":
            return ValueTooLarge(0)
        if text.startswith(StaleMap.PREFIX):
            sent, _, known = text[len(StaleMap.PREFIX) :].partition(" is older than epoch ")
            known = known.partition(" ")[0]
            if sent.isdigit() and known.isdigit():
                return StaleMap(int(sent), int(known))
        if text.startswith(KeyLeased.PREFIX):
            until = text[len(KeyLeased.PREFIX) :]
            if until.isdigit():
                return KeyLeased(int(until))
        if text.startswith(DeadlinePassed.PREFIX):
            deadline = text[len(DeadlinePassed.PREFIX) :].partition(":")[0]
            if deadline.isdigit():
                return DeadlinePassed(int(deadline), text[len(DeadlinePassed.PREFIX) + len(deadline) :])
        if text.startswith(_STALE):
            try:
                return StaleVersion(Version.parse(text[len(_STALE) :]))
            except ValueError:
                return StaleVersion()
        return _SERVER_ERRORS.get(text, ServiceUnavailable)(text)
    return None


class ReplyParser:
    """Turns a server's reply bytes into results, given the command each reply answers.

    ``feed(data)``, then ``next(command)`` for the oldest command waiting: its result (a ``Result``, or a
    ``DomainError`` the server answered with, returned, not raised), or None until more bytes come.
    A reply that does not parse raises ``BadReply``: the connection must be dropped. A line is bounded
    by ``max_line`` and a value by ``max_value_size``.
    """

    __slots__ = (
        "_buf",
        "_items",
        "_more",
        "_more_len",
        "_need",
        "_pos",
        "_result",
        "_rows",
        "max_line",
        "max_value_size",
    )

    def __init__(self, max_value_size: int = 128 * 1024 * 1024, max_line: int = 4096) -> None:
        self.max_value_size = max_value_size
        self.max_line = max_line
        self._buf = b""
        self._pos = 0
        self._items: list[tuple[bytes, Record]] = []  # the values of a reply read so far
        self._result: Status | Number | None = None  # an xapply's result line, once read
        self._rows: list[Any] = []  # the DIGEST or XKEY lines of a reply read so far
        # A long value arrives in many reads: they are kept apart and joined once, when the value is whole
        # (joining at each read copied a 1 MB value about 16 times over).
        self._need = 0  # bytes from _pos the value being read needs (0: none known)
        self._more: list[bytes] = []
        self._more_len = 0

    def feed(self, data: bytes) -> None:
        """Add bytes read from the connection."""
        if self._need:
            if len(self._buf) - self._pos + self._more_len + len(data) < self._need:
                self._more.append(data)
                self._more_len += len(data)
                return
            self._need = 0
            if self._more:
                data = b"".join([*self._more, data])
                self._more.clear()
                self._more_len = 0
        if self._pos >= len(self._buf):
            self._buf = data
        else:
            self._buf = self._buf[self._pos :] + data
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not read into a result yet."""
        return len(self._buf) - self._pos + self._more_len

    def _line(self) -> bytes | None:
        end = self._buf.find(b"\r\n", self._pos)
        if end < 0:
            if len(self._buf) - self._pos > self.max_line:
                raise BadReply("reply line too long")
            return None
        line = self._buf[self._pos : end]
        self._pos = end + 2
        return line

    def _block(self, size: int) -> bytes | None:
        """The data block of ``size`` bytes after a value line, or None (then nothing is consumed)."""
        if size > self.max_value_size:
            raise BadReply(f"value of {size} bytes announced")
        end = self._pos + size
        if len(self._buf) < end + 2:
            self._need = end + 2  # where the block ends in _buf (next() makes it relative to the reply's start)
            return None
        if self._buf[end : end + 2] != b"\r\n":
            raise BadReply("data block not ended by CRLF")
        value = self._buf[self._pos : end]
        self._pos = end + 2
        return value

    def next(self, command: Command | SplicedGet) -> Result | bytes | DomainError | None:
        """The reply to ``command`` once it is complete, else None."""
        if isinstance(command, SplicedGet):
            return self._spliced_get()
        kind = type(command)
        if (kind is XGet or kind is XLease) and not self._items:
            whole = self._xget_reply()
            if whole is not None:
                return whole
        if kind is XVer:
            return self._version_of()
        if kind is XDigest or kind is XList:
            return self._rows_reply(command)  # type: ignore[arg-type]  # narrowed by the test above
        while True:
            start = self._pos
            line = self._line()
            if line is None:
                return None
            if kind is Get or kind is XGet or kind is XLease or kind is XApply and self._result is not None:
                if line == b"END":
                    return self._finish(command)
                if line.startswith(b"VALUE ") and kind is Get:
                    item = self._value(line)
                elif line.startswith(b"XVALUE ") and kind is not Get:
                    item = self._xvalue(line)
                else:
                    if self._items or self._result is not None:
                        raise BadReply(f"unexpected reply line {line[:60]!r}")
                    return self._error(line)
                if item is None:
                    self._pos = start  # the data block is not all here: read the line again later
                    self._need -= start
                    return None
                self._items.append(item)
                continue
            return self._single(command, line)

    def _spliced_get(self) -> bytes | DomainError | None:
        """The reply to a ``SplicedGet`` as it came: ``END``, or one ``VALUE`` block and ``END``; an error line
        as its error; None until it is all here."""
        buf = self._buf
        pos = self._pos
        if buf.startswith(b"END\r\n", pos):
            self._pos = pos + 5
            return b"END\r\n"
        if not buf.startswith(b"VALUE ", pos):
            line = self._line()
            return None if line is None else self._error(line)
        end = buf.find(b"\r\n", pos)
        if end < 0:
            if len(buf) - pos > self.max_line:
                raise BadReply("reply line too long")
            return None
        parts = buf[pos + 6 : end].split(b" ")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise BadReply(f"unexpected reply line {buf[pos:end][:60]!r}")
        size = int(parts[2])
        if size > self.max_value_size:
            raise BadReply(f"value of {size} bytes announced")
        stop = end + 2 + size
        if len(buf) < stop + 7:
            return None
        if buf[stop : stop + 7] != b"\r\nEND\r\n":
            raise BadReply("a get's value not followed by END")
        self._pos = stop + 7
        return buf[pos : stop + 7]

    def _version_of(self) -> VersionOf | DomainError | None:
        """The reply to an ``XVer``: ``XVER <version>`` or ``END`` (an error line as its error: ``ERROR`` from
        a kvstore of an earlier version, which does not know the verb), None until the line is here."""
        line = self._line()
        if line is None:
            return None
        if line == b"END":
            return _NO_VERSION
        if not line.startswith(b"XVER "):
            return self._error(line)
        try:
            return VersionOf(parse_version(line[5:]))
        except ValueError:  # UnicodeDecodeError included
            raise BadReply(f"bad XVER line {line[:60]!r}") from None

    def _xget_reply(self) -> Values | None:
        """The common replies to an ``xget``, read in one go: ``END``, or one well-formed ``XVALUE``
        block and ``END``, all buffered. None for anything else (nothing is consumed then, and the
        general path reads it, or says what is wrong with it)."""
        buf = self._buf
        pos = self._pos
        if buf.startswith(b"END\r\n", pos):
            self._pos = pos + 5
            return _NO_VALUES
        if not buf.startswith(b"XVALUE ", pos):
            return None
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        parts = buf[pos + 7 : end].split(b" ")
        if len(parts) != 6:
            return None
        key, flags, expires_at, version, tombstone, size = parts
        if not (flags.isdigit() and expires_at.isdigit() and size.isdigit()) or tombstone not in (b"0", b"1"):
            return None
        start = end + 2
        stop = start + int(size)
        if stop - start > self.max_value_size or buf[stop : stop + 7] != b"\r\nEND\r\n":
            return None
        try:
            parsed = parse_version(version)
        except ValueError:  # UnicodeDecodeError included
            return None
        self._pos = stop + 7
        record = Record(buf[start:stop], int(flags), int(expires_at), parsed, tombstone == b"1")
        return Values(((key, record),))

    def _rows_reply(self, command: XDigest | XList) -> Digests | KeyVersions | DomainError | None:
        """The reply to an anti-entropy command: its DIGEST or XKEY lines (no more than it asked for) and END."""
        rows = self._rows
        digest = isinstance(command, XDigest)
        most = command.parts if isinstance(command, XDigest) else command.limit
        while True:
            line = self._line()
            if line is None:
                return None
            if line == b"END":
                self._rows = []
                return Digests(tuple(rows)) if digest else KeyVersions(tuple(rows))
            if line.startswith(b"DIGEST " if digest else b"XKEY ") and len(rows) < most:
                rows.append(_digest_line(line) if digest else _xkey_line(line))
            elif not rows:
                return self._error(line)
            else:
                raise BadReply(f"unexpected reply line {line[:60]!r}")

    def _finish(self, command: Command) -> Result:
        items = tuple(self._items)
        self._items.clear()
        if type(command) is XApply:
            result, self._result = self._result, None
            assert result is not None
            return XApplied(result, items[0][1] if items else None)
        return Values(items)

    def _single(self, command: Command, line: bytes) -> Result | DomainError | None:
        kind = type(command)
        if kind is XApply:
            if line.startswith(b"XAPPLIED "):
                result = self._status_or_number(line[9:], Arith)
                if not isinstance(result, (Status, Number)):
                    raise BadReply(f"unexpected reply line {line[:60]!r}")
                self._result = result
                return cast("Result | DomainError | None", self.next(command))  # an XApply's: no bytes
            return self._error(line)
        if kind is StatsCommand:
            if line == b"RESET":
                return StatsResult(())
            if line.startswith(b"STAT ") or line == b"END":
                self._pos -= len(line) + 2
                return self._stats()
            return self._error(line)
        if kind is XBulk:
            if line.startswith(b"XBULKED "):
                return Bulked(*self._counts(line[8:], 2))
            return self._error(line)
        if kind is BulkProbe:
            if line.startswith(b"XBULK "):
                return BulkFormat(*self._counts(line[6:], 1))
            return self._error(line)
        if kind is VersionCommand:
            if line.startswith(b"VERSION "):
                return StatsResult((("version", line[8:].decode("utf-8", "replace")),))
            return self._error(line)
        return self._status_or_number(line, kind)

    @staticmethod
    def _counts(text: bytes, count: int) -> list[int]:
        """The ``count`` numbers of a reply line's rest."""
        numbers = text.split(b" ")
        if len(numbers) != count or not all(number.isdigit() and len(number) < 20 for number in numbers):
            raise BadReply(f"unexpected reply numbers {text[:60]!r}")
        return [int(number) for number in numbers]

    def _status_or_number(self, line: bytes, kind: type) -> Status | Number | DomainError:
        status = _STATUS_BY_LINE.get(line)
        if status is not None:
            return status
        if kind is Arith and line.isdigit():
            return Number(int(line))
        return self._error(line)

    def _stats(self) -> StatsResult | None:
        start = self._pos
        items: list[tuple[str, str]] = []
        while True:
            line = self._line()
            if line is None:
                self._pos = start
                return None
            if line == b"END":
                return StatsResult(tuple(items))
            if not line.startswith(b"STAT "):
                raise BadReply(f"unexpected reply line {line[:60]!r}")
            name, _, value = line[5:].decode("utf-8", "replace").partition(" ")
            items.append((name, value))

    def _error(self, line: bytes) -> DomainError:
        error = error_from_reply(line)
        if error is None:
            raise BadReply(f"unexpected reply line {line[:60]!r}")
        return error

    def _value(self, line: bytes) -> tuple[bytes, Record] | None:
        parts = line.split(b" ")
        if len(parts) not in (4, 5) or not all(p.isdigit() for p in parts[2:]):
            raise BadReply(f"bad VALUE line {line[:60]!r}")
        value = self._block(int(parts[3]))
        if value is None:
            return None
        version = Version(int(parts[4])) if len(parts) == 5 else Version(0)
        return parts[1], Record(value, int(parts[2]), 0, version)

    def _xvalue(self, line: bytes) -> tuple[bytes, Record] | None:
        parts = line.split(b" ")
        try:
            if len(parts) != 7 or parts[5] not in (b"0", b"1"):
                raise ValueError
            flags, expires_at, size = int(parts[2]), int(parts[3]), int(parts[6])
            version = parse_version(parts[4])
        except ValueError:  # UnicodeDecodeError included
            raise BadReply(f"bad XVALUE line {line[:60]!r}") from None
        value = self._block(size)
        if value is None:
            return None
        return parts[1], Record(value, flags, expires_at, version, parts[5] == b"1")
