"""The memcached text protocol's pure parser and serializer (chashd.memcache.text)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chashd.commands import (
    Arith,
    Command,
    Delete,
    Digests,
    FlushAll,
    Get,
    KeyVersions,
    Lease,
    MetaCommand,
    Number,
    Quit,
    SplicedGet,
    StatsCommand,
    StatsResult,
    Status,
    Store,
    Touch,
    Values,
    Verbosity,
    VersionCommand,
    VersionOf,
    XApplied,
    XApply,
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
from chashd.digests import RangeDigest
from chashd.errors import (
    BadCommand,
    BadDataChunk,
    DeadlinePassed,
    DomainError,
    KeyLeased,
    NodeLeaving,
    NonNumericValue,
    ServiceUnavailable,
    StaleMap,
    StaleVersion,
    UnknownCommand,
    ValueTooLarge,
)
from chashd.memcache.text import (
    DEFAULT_MAX_KEYS,
    DEFAULT_MAX_LINE,
    DEFAULT_MAX_VALUE_SIZE,
    BadReply,
    FailedRequest,
    ReplyParser,
    RequestParser,
    error_from_reply,
    error_reply,
    plain_get_reply,
    serialize_command,
    serialize_result,
    stats_reply,
    version_reply,
)
from chashd.record import Record
from chashd.versions import Version


def rej(error: Exception, reply: bool = True, close: bool = False, then: Command | None = None) -> tuple[object, ...]:
    """A FailedRequest in a form that compares by value (exceptions compare by identity)."""
    return (type(error), str(error), reply, close, then)


def raw_events(data: bytes, chunk: int | None = None, **limits: int) -> list[Command | FailedRequest]:
    """Every event the parser yields for ``data``, fed whole or ``chunk`` bytes at a time."""
    assert set(limits) <= {"max_value_size", "max_line", "max_keys"}, limits
    parser = RequestParser(
        limits.get("max_value_size", DEFAULT_MAX_VALUE_SIZE),
        limits.get("max_line", DEFAULT_MAX_LINE),
        limits.get("max_keys", DEFAULT_MAX_KEYS),
    )
    out: list[Command | FailedRequest] = []
    pieces = [data] if chunk is None else [data[i : i + chunk] for i in range(0, len(data), chunk)]
    for piece in pieces:
        parser.feed(piece)
        while (event := parser.next()) is not None:
            assert not isinstance(event, bytes)  # plain gets only when asked for
            out.append(event)
    return out


def events(data: bytes, chunk: int | None = None, **limits: int) -> list[object]:
    """``raw_events``, with each FailedRequest as ``rej()`` gives it."""
    return [
        rej(e.error, e.reply, e.close, e.then) if isinstance(e, FailedRequest) else e
        for e in raw_events(data, chunk, **limits)
    ]


def one(data: bytes, **limits: int) -> object:
    """The single event for ``data``; the same fed a byte at a time."""
    whole = events(data, **limits)
    assert len(whole) == 1, whole
    assert events(data, chunk=1, **limits) == whole
    return whole[0]


def replies(data: bytes, chunk: int | None = None, **limits: int) -> list[bytes | str]:
    """What a server would answer to each event: an error line, 'CLOSE', 'SILENT' or the command."""
    out: list[bytes | str] = []
    for event in raw_events(data, chunk, **limits):
        if isinstance(event, FailedRequest):
            out.append(error_reply(event.error) if event.reply else "SILENT")
            if event.close:
                out.append("CLOSE")
        else:
            out.append(type(event).__name__)
    return out


class CommandParsingTests:
    """Well-formed lines become commands."""

    def test_retrieval(self) -> None:
        """get, gets, bget, gat and gats with one or several keys."""
        assert one(b"get k\r\n") == Get((b"k",))
        assert one(b"get a b c\r\n") == Get((b"a", b"b", b"c"))
        assert one(b"gets a b\r\n") == Get((b"a", b"b"), cas=True)
        assert one(b"bget a\r\n") == Get((b"a",))
        assert one(b"gat 10 a b\r\n") == Get((b"a", b"b"), exptime=10)
        assert one(b"gats -1 a\r\n") == Get((b"a",), cas=True, exptime=-1)
        assert one(b"gat 10\r\n") == Get((), exptime=10)

    def test_plain_gets(self) -> None:
        """With ``plain_gets``, a get of one plain key is the key itself; everything else is unchanged."""
        data = b"get k\nget a b\r\ngets k\r\nget  k\r\nget " + b"x" * 251 + b"\r\nset k 0 0 1\r\nv\r\nget k\r\n"
        parser = RequestParser(plain_gets=True)
        parser.feed(data)
        plain: list[object] = []
        while (event := parser.next()) is not None:
            plain.append(event)
        assert plain[0] == b"k" and plain[-1] == b"k"
        as_commands = [Get((e,)) if isinstance(e, bytes) else e for e in plain]
        assert [rej(e.error, e.reply) if isinstance(e, FailedRequest) else e for e in as_commands] == events(data)
        assert [type(e) for e in raw_events(data)] == [Get, Get, Get, Get, FailedRequest, Store, Get]

    def test_plain_get_of_a_whole_read(self) -> None:
        """``plain_get(data)`` takes a read that is exactly one plain get line, and nothing else."""
        parser = RequestParser(plain_gets=True)
        assert parser.plain_get(b"get k\r\n") == b"k"
        assert parser.plain_get(b"get k\n") == b"k"
        for data in (b"get a b\r\n", b"get k", b"get k\r\nget j\r\n", b"gets k\r\n", b"get \r\n", b"get k\0\n"):
            assert parser.plain_get(data) is None, data
        assert parser.plain_get(b"get " + b"x" * 251 + b"\r\n") is None
        assert RequestParser().plain_get(b"get k\r\n") is None
        parser.feed(b"ge")  # something buffered: the next read is fed
        assert parser.plain_get(b"t k\r\n") is None

    def test_plain_get_first_is_not_binary_later(self) -> None:
        """A connection whose first read was a plain get speaks the text protocol: a later magic byte is
        an unknown command, as when the get went through ``feed``."""
        taken, fed = RequestParser(plain_gets=True), RequestParser(plain_gets=True)
        assert taken.plain_get(b"get k\r\n") == b"k"
        fed.feed(b"get k\r\n")
        assert fed.next() == b"k"
        for parser in (taken, fed):
            parser.feed(b"\x80\r\n")
        results = [taken.next(), fed.next()]
        assert all(
            isinstance(r, FailedRequest) and not r.close and isinstance(r.error, UnknownCommand) for r in results
        )

    def test_storage(self) -> None:
        """The six storage commands with their data block, noreply included."""
        assert one(b"set k 1 2 3\r\nabc\r\n") == Store("set", b"k", 1, 2, b"abc")
        assert one(b"add k 0 0 1 noreply\r\nx\r\n") == Store("add", b"k", 0, 0, b"x", noreply=True)
        assert one(b"replace k 0 0 1\r\nx\r\n") == Store("replace", b"k", 0, 0, b"x")
        assert one(b"append k 0 0 1\r\nx\r\n") == Store("append", b"k", 0, 0, b"x")
        assert one(b"prepend k 0 0 1\r\nx\r\n") == Store("prepend", b"k", 0, 0, b"x")
        assert one(b"cas k 0 0 1 99\r\nx\r\n") == Store("cas", b"k", 0, 0, b"x", 99)
        assert one(b"cas k 0 0 1 99 noreply\r\nx\r\n") == Store("cas", b"k", 0, 0, b"x", 99, True)

    def test_values_hold_any_bytes(self) -> None:
        """A data block is taken by its length: CRLF, NUL and spaces inside are value bytes."""
        value = b"a\r\nb\0 c\r\n"
        assert one(b"set k 0 0 %d\r\n%s\r\n" % (len(value), value)) == Store("set", b"k", 0, 0, value)
        assert one(b"set k 0 0 0\r\n\r\n") == Store("set", b"k", 0, 0, b"")

    def test_other_commands(self) -> None:
        """delete, incr, decr, touch, flush_all, stats, version, verbosity, quit."""
        assert one(b"delete k\r\n") == Delete(b"k")
        assert one(b"delete k 0\r\n") == Delete(b"k")
        assert one(b"delete k noreply\r\n") == Delete(b"k", True)
        assert one(b"delete k 0 noreply\r\n") == Delete(b"k", True)
        assert one(b"incr k 5\r\n") == Arith(b"k", 5)
        assert one(b"decr k 18446744073709551615 noreply\r\n") == Arith(b"k", 2**64 - 1, False, True)
        assert one(b"touch k 10\r\n") == Touch(b"k", 10)
        assert one(b"touch k 10 noreply\r\n") == Touch(b"k", 10, True)
        assert one(b"flush_all\r\n") == FlushAll()
        assert one(b"flush_all 30\r\n") == FlushAll(30)
        assert one(b"flush_all noreply\r\n") == FlushAll(0, True)
        assert one(b"flush_all 5 noreply\r\n") == FlushAll(5, True)
        assert one(b"stats\r\n") == StatsCommand()
        assert one(b"stats settings\r\n") == StatsCommand("settings")
        assert one(b"stats detail on\r\n") == StatsCommand("detail on")
        assert one(b"version\r\n") == VersionCommand()
        assert one(b"verbosity 1\r\n") == Verbosity(1)
        assert one(b"verbosity 1 noreply\r\n") == Verbosity(1, True)
        assert one(b"quit\r\n") == Quit()

    def test_line_endings_and_spaces(self) -> None:
        """A bare LF ends a line; runs of spaces and leading or trailing spaces are fine."""
        assert one(b"get k\n") == Get((b"k",))
        assert one(b"  set   k 0 0 1  \r\nx\r\n") == Store("set", b"k", 0, 0, b"x")
        assert one(b"set k 0 0 1\nx\r\n") == Store("set", b"k", 0, 0, b"x")

    def test_keys_as_memcached(self) -> None:
        """Control characters other than space, LF and NUL are key bytes, as memcached takes them."""
        assert one(b"get a\x01b\r\n") == Get((b"a\x01b",))
        assert one(b"get a\tb\r\n") == Get((b"a\tb",))
        assert one(b"get " + b"k" * 250 + b"\r\n") == Get((b"k" * 250,))

    def test_numbers_as_memcached(self) -> None:
        """Numbers are read as memcached's C parsers read them."""
        assert one(b"set k +5 0 1\r\nx\r\n") == Store("set", b"k", 5, 0, b"x")
        assert one(b"set k -0 0 01\r\nx\r\n") == Store("set", b"k", 0, 0, b"x")
        assert one(b"set k 5\t 0 1\r\nx\r\n") == Store("set", b"k", 5, 0, b"x")
        assert one(b"set k 4294967296 0 1\r\nx\r\n") == Store("set", b"k", 0, 0, b"x")
        assert one(b"set k 18446744073709551615 0 1\r\nx\r\n") == Store("set", b"k", 2**32 - 1, 0, b"x")
        assert one(b"set k 0 0 4294967297\r\nx\r\n") == Store("set", b"k", 0, 0, b"x")
        assert one(b"set k 0 4294967295 1\r\nx\r\n") == Store("set", b"k", 0, -1, b"x")
        assert one(b"set k 0 0 1 foo\r\nx\r\n") == Store("set", b"k", 0, 0, b"x")
        assert one(b"set k 0 0 1\r\r\nx\r\n") == Store("set", b"k", 0, 0, b"x")

    def test_pipelined(self) -> None:
        """Several commands in one read come out in order, whole or fed a byte at a time."""
        data = b"set a 0 0 1\r\n1\r\nget a\r\nincr a 1\r\ndelete a noreply\r\nget a b\r\n"
        expected = [Store("set", b"a", 0, 0, b"1"), Get((b"a",)), Arith(b"a", 1), Delete(b"a", True), Get((b"a", b"b"))]
        assert events(data) == expected
        assert events(data, chunk=1) == expected
        assert events(data, chunk=7) == expected

    def test_large_value_fed_in_pieces(self) -> None:
        """A value that arrives in many reads is joined once and is exact."""
        value = bytes(range(256)) * 4000
        data = b"set k 0 0 %d\r\n%s\r\nget k\r\n" % (len(value), value)
        assert events(data, chunk=65536, max_value_size=2**20) == [Store("set", b"k", 0, 0, value), Get((b"k",))]

    def test_extension(self) -> None:
        """xget, xput and xapply parse into the versioned commands."""
        version = Version(123, "gw-1")
        assert one(b"xget a b\r\n") == XGet((b"a", b"b"))
        assert one(b"xput k 3 99 123-gw-1 0 2\r\nab\r\n") == XPut(b"k", Record(b"ab", 3, 99, version))
        assert one(b"xput k 0 0 7 1 0 noreply\r\n\r\n") == XPut(b"k", Record(b"", 0, 0, Version(7), True), True)
        assert one(b"xapply 123-gw-1 incr k 5\r\n") == XApply(version, Arith(b"k", 5))
        assert one(b"xapply 123-gw-1 append k 0 0 1 noreply\r\nx\r\n") == XApply(
            version, Store("append", b"k", 0, 0, b"x")
        )
        assert one(b"xapply 123-gw-1 delete k\r\n") == XApply(version, Delete(b"k"))


class RejectionTests:
    """Bad input answers as memcached 1.6.18 answers it (checked against it in the differential test)."""

    def test_unknown_and_wrong_token_counts(self) -> None:
        """Unknown commands, too short names and wrong token counts are ERROR."""
        for line in [b"foo", b"", b"a", b"set", b"get", b"gets", b"set k 0 0", b"cas k 0 0 1", b"incr k",
                     b"delete", b"touch k", b"verbosity", b"verbosity 1 2 3", b"flush_all 1 2 3", b"GET",
                     b"set k 0 0 1 noreply extra", b"delete k 0 noreply x"]:  # fmt: skip
            assert replies(line + b"\r\n") == [b"ERROR\r\n"], line

    def test_binary_answers_error(self) -> None:
        """A binary request answers ERROR and closes."""
        assert replies(b"\x80\x00\x00\x05\x00\x00\x00\x00\n" + b"\x00" * 20) == [b"ERROR\r\n", "CLOSE"]

    def test_meta_commands(self) -> None:
        """The meta commands parse into MetaCommand with their flags, in order and as numbers; ms reads its data
        block (the same fed a byte at a time); a refused ms skips its data block."""
        assert one(b"mg k v T30 N-1 R5 Oab q\r\n") == MetaCommand(
            "mg", b"k", (b"v", b"T30", b"N-1", b"R5", b"Oab", b"q"), noreply=True, ttl=30, vivify=-1, recache=5
        )
        assert one(b"ms k 2 MA C7 F9 T0 I c\r\nhi\r\n") == MetaCommand(
            "ms",
            b"k",
            (b"MA", b"C7", b"F9", b"T0", b"I", b"c"),
            b"hi",
            False,
            "A",
            0,
            client_flags=9,
            cas=7,
            invalidate=True,
        )
        assert one(b"ma n MD D5 N0 J3 C2 T9\r\n") == MetaCommand(
            "ma", b"n", (b"MD", b"D5", b"N0", b"J3", b"C2", b"T9"), mode="D", ttl=9, vivify=0, cas=2, delta=5, initial=3
        )
        assert one(b"md k I T5 q\r\n") == MetaCommand(
            "md", b"k", (b"I", b"T5", b"q"), noreply=True, ttl=5, invalidate=True
        )
        assert one(b"mn\r\n") == MetaCommand("mn") and one(b"me k\r\n") == MetaCommand("me", b"k")
        assert replies(b"ms k 3 Mz\r\nabc\r\nmn\r\n") == [
            b"CLIENT_ERROR invalid mode for ms M token\r\n",
            "MetaCommand",
        ]
        assert replies(b"ms k 2 q q\r\nab\r\nmn\r\n") == [b"CLIENT_ERROR duplicate flag\r\n", "MetaCommand"]
        assert replies(b"ma k Dx\r\nmd k zz\r\nmg k h\r\n") == [
            b"CLIENT_ERROR invalid or duplicate flag\r\n",
            b"CLIENT_ERROR invalid or duplicate flag\r\n",
            b"CLIENT_ERROR flags h and l (hit before, last access) are not supported\r\n",
        ]

    def test_bad_numbers(self) -> None:
        """Bad numbers are CLIENT_ERROR with memcached's words for each command."""
        bad = b"CLIENT_ERROR bad command line format\r\n"
        assert replies(b"set k x 0 1\r\n") == [bad]
        assert replies(b"set k 0 0 -1\r\n") == [bad]
        assert replies(b"set k 5abc 0 1\r\n") == [bad]
        assert replies(b"set k -1 0 1\r\n") == [bad]
        assert replies(b"set k 18446744073709551616 0 1\r\n") == [bad]
        assert replies(b"set k 0 0 2147483646\r\n") == [bad]
        assert replies(b"cas k 0 0 1 abc\r\n") == [bad]
        assert replies(b"verbosity x\r\n") == [bad]
        assert replies(b"incr k -1\r\n") == [b"CLIENT_ERROR invalid numeric delta argument\r\n"]
        assert replies(b"touch k abc\r\n") == [b"CLIENT_ERROR invalid exptime argument\r\n"]
        assert replies(b"gat abc k\r\n") == [b"CLIENT_ERROR invalid exptime argument\r\n"]
        assert replies(b"flush_all abc\r\n") == [b"CLIENT_ERROR invalid exptime argument\r\n"]
        usage = b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n"
        assert replies(b"delete k 1\r\n") == [usage]
        assert replies(b"delete k x y\r\n") == [usage]

    def test_the_data_line_of_a_bad_command_is_a_command(self) -> None:
        """After a storage command line that fails, its data line is read as the next command."""
        assert replies(b"set k 0 0 -1\r\nab\r\n") == [b"CLIENT_ERROR bad command line format\r\n", b"ERROR\r\n"]
        assert replies(b"cas k 0 0 1\r\nx\r\n") == [b"ERROR\r\n", b"ERROR\r\n"]

    def test_key_too_long(self) -> None:
        """A key over 250 bytes is CLIENT_ERROR bad command line format in every command."""
        key = b"k" * 251
        bad = b"CLIENT_ERROR bad command line format\r\n"
        for line in [b"get " + key, b"get a " + key + b" b", b"set " + key + b" 0 0 1", b"delete " + key,
                     b"incr " + key + b" 1", b"touch " + key + b" 1", b"gat 1 " + key, b"xget " + key]:  # fmt: skip
            assert replies(line + b"\r\n") == [bad], line
        assert replies(b"delete " + key + b" x\r\n") == [
            b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n"
        ]

    def test_bad_data_chunk(self) -> None:
        """A data block that does not end in CRLF is bad; what follows it is the next command."""
        assert replies(b"set k 0 0 3\r\nabcde\r\n") == [b"CLIENT_ERROR bad data chunk\r\n", b"ERROR\r\n"]
        assert replies(b"set k 0 0 1\r\nx\nget k\r\n") == [b"CLIENT_ERROR bad data chunk\r\n", b"ERROR\r\n"]
        assert events(b"set k 0 0 1\r\nxy\r\nget k\r\n")[0] == rej(BadDataChunk())

    def test_noreply_silences_errors(self) -> None:
        """noreply silences the command's own errors, not those found before it is seen."""
        assert replies(b"set k 0 0 3 noreply\r\nabcde\r\n") == ["SILENT", b"ERROR\r\n"]
        assert replies(b"set k x 0 1 noreply\r\nx\r\n") == ["SILENT", b"ERROR\r\n"]
        assert replies(b"incr k x noreply\r\n") == ["SILENT"]
        assert replies(b"delete k 1 noreply\r\n") == ["SILENT"]
        assert replies(b"set k 0 0 noreply\r\n") == ["SILENT"]

    def test_nul_ends_the_line(self) -> None:
        """memcached reads a line as a C string: a NUL cuts it."""
        assert replies(b"set a\x00b 0 0 1\r\nx\r\n") == [b"ERROR\r\n", b"ERROR\r\n"]
        assert one(b"get k\x00 junk\r\n") == Get((b"k",))

    def test_value_too_large_is_swallowed(self) -> None:
        """A value over the limit answers SERVER_ERROR, its block is skipped, a set deletes the key."""
        data = b"set k 0 0 20\r\n" + b"x" * 20 + b"\r\nget k\r\n"
        for chunk in (None, 1, 5):
            got = events(data, chunk=chunk, max_value_size=10)
            assert got == [rej(ValueTooLarge(20, 10), then=Delete(b"k", True)), Get((b"k",))]
        assert error_reply(ValueTooLarge(20, 10)) == b"SERVER_ERROR object too large for cache\r\n"
        got = events(b"add k 0 0 20 noreply\r\n" + b"x" * 20 + b"\r\nget k\r\n", max_value_size=10)
        assert got == [rej(ValueTooLarge(20, 10), reply=False), Get((b"k",))]

    def test_long_lines(self) -> None:
        """Past 2048 bytes without a newline the connection closes, except a get line; a whole
        line is read up to memcached's 16 KiB read buffer."""
        assert replies(b"x" * 2049) == ["SILENT", "CLOSE"]
        assert replies(b"x" * 2048) == []
        assert replies(b"x" * 3000 + b"\r\n") == [b"ERROR\r\n"]
        assert replies(b"x" * 16382 + b"\r\n") == [b"ERROR\r\n"]
        assert replies(b"x" * 16383 + b"\r\n") == ["SILENT", "CLOSE"]
        assert replies(b"get " + b"k " * 3000) == []
        assert events(b"get " + b"k " * 3000 + b"\r\n", chunk=1000, max_keys=5000) == [Get((b"k",) * 3000)]
        assert replies(b" " * 101 + b"get " + b"k" * 2000) == ["SILENT", "CLOSE"]
        # The extension's xget is read like a get: a gateway's read of many keys is one line.
        long_keys = [b"%0250d" % i for i in range(2048)]
        got = events(b"xget " + b" ".join(long_keys) + b"\r\n", chunk=4096)
        assert got == [XGet(tuple(long_keys))]

    def test_get_line_limits(self) -> None:
        """A get line past max_keys keys is refused; one past the byte bound closes."""
        assert replies(b"get a b c\r\n", max_keys=2) == [
            b"CLIENT_ERROR too many keys in one request (the limit is 2)\r\n"
        ]
        assert replies(b"get " + b"k" * 200 + b" " + b"k " * 2000, max_keys=4) == [
            b"SERVER_ERROR out of memory reading request\r\n",
            "CLOSE",
        ]

    def test_http_closes(self) -> None:
        """A line ending in an HTTP version closes silently, as memcached does; a get does not."""
        assert replies(b"GET / HTTP/1.1\r\nHost: x\r\n") == ["SILENT", "CLOSE"]
        assert replies(b"get HTTP/1.1\r\n") == ["Get"]
        assert replies(b"gxx HTTP/1.1\r\n") == [b"ERROR\r\n"]

    def test_nothing_after_close_or_quit(self) -> None:
        """After quit or a closing rejection, nothing more is parsed."""
        assert events(b"quit\r\nget k\r\n") == [Quit()]
        assert replies(b"x" * 3000 + b"\r\nget k\r\n", chunk=3000) == ["SILENT", "CLOSE"]

    def test_extension_errors(self) -> None:
        """Bad xput/xapply lines are CLIENT_ERROR; a bad inner command answers like the plain one."""
        assert replies(b"xput k 0 0 bad 0 1\r\nx\r\n")[0] == b"CLIENT_ERROR bad version\r\n"
        assert replies(b"xput k 0 0 1 2 1\r\nx\r\n")[0] == b"CLIENT_ERROR bad command line format\r\n"
        assert replies(b"xput k 0 0 1 0\r\n") == [b"CLIENT_ERROR bad command line format\r\n"]
        # Bounded numbers: a clock past 63 bits, a writer that is not an id, flags or expires_at
        # past 32 bits.
        for line in (
            b"xput k 0 0 18446744073709551615-x 0 1",
            b"xput k 0 0 9223372036854775808 0 1",
            b"xput k 0 0 1-a/b 0 1",
            b"xput k 4294967296 0 1 0 1",
            b"xput k 0 4294967296 1 0 1",
        ):
            first = replies(line + b"\r\nx\r\n")[0]
            assert isinstance(first, bytes) and first.startswith(b"CLIENT_ERROR bad "), line
        largest = Record(b"x", 2**32 - 1, 2**32 - 1, Version(2**63 - 1, "x"))
        assert events(b"xput k 4294967295 4294967295 9223372036854775807-x 0 1\r\nx\r\n") == [XPut(b"k", largest)]
        assert replies(b"xapply 1 get k\r\n") == [b"ERROR\r\n"]
        assert replies(b"xapply 1 incr k x noreply\r\n") == [b"CLIENT_ERROR invalid numeric delta argument\r\n"]
        got = events(b"xput k 0 0 1 0 20\r\n" + b"x" * 20 + b"\r\nxget k\r\n", max_value_size=10)
        assert got == [rej(ValueTooLarge(20, 10)), XGet((b"k",))]


R = Record(b"val", 5, 0, Version(77, "w"))


class SerializeResultTests:
    """Results to reply bytes."""

    def test_status_and_number(self) -> None:
        """Statuses are their word; numbers are decimal."""
        assert serialize_result(Delete(b"k"), Status.DELETED) == b"DELETED\r\n"
        assert serialize_result(Arith(b"k", 1), Number(2**64 - 1)) == b"18446744073709551615\r\n"

    def test_plain_get_reply(self) -> None:
        """The reply to a plain get is the one ``serialize_result`` makes of its hit or miss."""
        assert plain_get_reply(b"a", (R.flags, R.value)) == serialize_result(Get((b"a",)), Values(((b"a", R),)))
        assert plain_get_reply(b"a", None) == serialize_result(Get((b"a",)), Values(())) == b"END\r\n"

    def test_values(self) -> None:
        """VALUE blocks, with the cas unique for gets, and END."""
        items = ((b"a", R), (b"b", Record(b"", 0, 0, Version(9))))
        assert serialize_result(Get((b"a",)), Values(items[:1])) == b"VALUE a 5 3\r\nval\r\nEND\r\n"
        assert serialize_result(Get((b"a", b"b")), Values(items)) == (
            b"VALUE a 5 3\r\nval\r\nVALUE b 0 0\r\n\r\nEND\r\n"
        )
        assert serialize_result(Get((b"a", b"b"), cas=True), Values(items)) == (
            b"VALUE a 5 3 77\r\nval\r\nVALUE b 0 0 9\r\n\r\nEND\r\n"
        )
        assert serialize_result(Get((b"x",)), Values(())) == b"END\r\n"

    def test_extension(self) -> None:
        """XVALUE blocks and XAPPLIED replies."""
        assert serialize_result(XGet((b"a",)), Values(((b"a", R),))) == b"XVALUE a 5 0 77-w 0 3\r\nval\r\nEND\r\n"
        command = XApply(Version(77, "w"), Arith(b"a", 1))
        assert serialize_result(command, XApplied(Number(3), R)) == (
            b"XAPPLIED 3\r\nXVALUE a 5 0 77-w 0 3\r\nval\r\nEND\r\n"
        )
        assert serialize_result(command, XApplied(Status.NOT_FOUND, None)) == b"XAPPLIED NOT_FOUND\r\nEND\r\n"

    def test_stats_version_errors(self) -> None:
        """STAT lines, VERSION, and error lines."""
        assert stats_reply([("pid", "1"), ("uptime", "2")]) == b"STAT pid 1\r\nSTAT uptime 2\r\nEND\r\n"
        assert serialize_result(StatsCommand(), StatsResult((("a", "b"),))) == b"STAT a b\r\nEND\r\n"
        assert version_reply("0.1.0") == b"VERSION 0.1.0\r\n"
        assert error_reply(UnknownCommand()) == b"ERROR\r\n"
        assert error_reply(NonNumericValue()) == b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
        assert error_reply(NodeLeaving()) == b"SERVER_ERROR this node is leaving the ring and refuses writes\r\n"
        assert error_reply(RuntimeError("secret\r\ndetail")) == b"SERVER_ERROR internal error\r\n"
        assert error_reply(ServiceUnavailable("a\r\nb")) == b"SERVER_ERROR a  b\r\n"


# -- client side ------------------------------------------------------------------------------------

keys = st.binary(min_size=1, max_size=250).filter(lambda k: b" " not in k and b"\n" not in k and b"\0" not in k)
values = st.binary(max_size=300)
u32 = st.integers(0, 2**32 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
u64 = st.integers(0, 2**64 - 1)
versions = st.builds(Version, st.integers(0, 2**63 - 1), st.sampled_from(["", "gw-1", "a"]))
stores = st.one_of(
    st.builds(Store, st.sampled_from(["set", "add", "replace", "append", "prepend"]), keys, u32, i32, values,
              st.none(), st.booleans()),
    st.builds(Store, st.just("cas"), keys, u32, i32, values, u64, st.booleans()),
)  # fmt: skip
writes = st.one_of(
    stores,
    st.builds(Delete, keys, st.booleans()),
    st.builds(Arith, keys, u64, st.booleans(), st.booleans()),
    st.builds(Touch, keys, i32, st.booleans()),
)
records = st.builds(Record, values, u32, st.integers(0, 2**32 - 1), versions, st.booleans())
hashes = st.integers(0, 2**32 - 1)
placements = st.text("0123456789abcdef", min_size=1, max_size=16)
positions = st.none() | st.tuples(hashes, keys)
commands = st.one_of(
    writes,
    st.builds(Get, st.lists(keys, min_size=1, max_size=5).map(tuple), st.booleans(), st.none() | i32),
    st.builds(FlushAll, st.integers(0, 2**31 - 1), st.booleans()),
    st.builds(Verbosity, u32, st.booleans()),
    st.builds(XGet, st.lists(keys, min_size=1, max_size=5).map(tuple)),
    st.builds(XVer, keys),
    st.builds(XPut, keys, records, st.booleans()),
    st.builds(XApply, versions, writes.map(lambda c: dataclasses.replace(c, noreply=False))),
    st.builds(XDigest, placements, hashes, st.just(2**32 - 1), st.integers(1, 256), st.sampled_from(["", "kv"])),
    st.builds(XList, placements, hashes, st.just(2**32 - 1), st.integers(1, 10**4), positions),
    st.just(StatsCommand()),
    st.just(StatsCommand("settings")),
    st.just(VersionCommand()),
    st.just(Quit()),
)  # fmt: skip


class SerializeCommandTests:
    """The client's requests: parsing them gives the command back."""

    @settings(max_examples=400)
    @given(commands)
    def test_round_trip(self, command: Command) -> None:
        """parse(serialize(command)) == command, for every command, whole and byte by byte."""
        data = serialize_command(command)
        assert events(data, max_value_size=1000) == [command]
        assert events(data, chunk=3, max_value_size=1000) == [command]

    def test_examples(self) -> None:
        """A few requests spelled out."""
        assert serialize_command(Get((b"a", b"b"), cas=True)) == b"gets a b\r\n"
        assert serialize_command(Get((b"a",), exptime=5)) == b"gat 5 a\r\n"
        assert serialize_command(Store("cas", b"k", 1, 2, b"xy", 9, True)) == b"cas k 1 2 2 9 noreply\r\nxy\r\n"
        assert serialize_command(XApply(Version(5, "g"), Arith(b"k", 2, False))) == b"xapply 5-g decr k 2\r\n"
        assert serialize_command(XPut(b"k", Record(b"v", 1, 2, Version(3, "g"), True))) == (
            b"xput k 1 2 3-g 1 1\r\nv\r\n"
        )
        with pytest.raises(TypeError):
            serialize_command(object())  # type: ignore[arg-type]

    def test_xmove_round_trip(self) -> None:
        """``xmove`` is an xput with ``handoff`` set: serialized and parsed back equal."""
        command = XPut(b"k", Record(b"v", 0, 0, Version(7, "w")), handoff=True)
        wire = serialize_command(command)
        assert wire.startswith(b"xmove k 0 0 7-w 0 1\r\n")
        parser = RequestParser()
        parser.feed(wire + serialize_command(XPut(b"k", Record(b"v", 0, 0, Version(8, "w")))))
        assert parser.next() == command
        plain = parser.next()
        assert isinstance(plain, XPut) and not plain.handoff


def read_replies(data: bytes, sent: list[Command], chunk: int | None = None) -> list[object]:
    """Feed reply bytes to a ReplyParser for the commands ``sent``; the results in order."""
    parser = ReplyParser(max_value_size=1000)
    pending = list(sent)
    out: list[object] = []
    pieces = [data] if chunk is None else [data[i : i + chunk] for i in range(0, len(data), chunk)]
    for piece in pieces:
        parser.feed(piece)
        while pending:
            result = parser.next(pending[0])
            if result is None:
                break
            out.append(result)
            pending.pop(0)
    assert not pending, f"no reply for {pending}"
    return out


class AntiEntropyCommandTests:
    """xdigest and xlist: requests, bad requests, replies."""

    def test_examples(self) -> None:
        """The requests spelled out, and what they parse into."""
        digest = XDigest("0a1b", 5, 2**32 - 1, 16, "kv-A")
        assert serialize_command(digest) == b"xdigest 0a1b 5 4294967295 16 kv-A\r\n"
        assert one(b"xdigest 0a1b 5 4294967295 16\r\n") == XDigest("0a1b", 5, 2**32 - 1, 16)
        listing = XList("ff", 0, 9, 100, (7, b"key"))
        assert serialize_command(listing) == b"xlist ff 0 9 100 7 key\r\n"
        assert one(b"xlist ff 0 9 100\r\n") == XList("ff", 0, 9, 100)

    def test_bad_requests(self) -> None:
        """Bad placements, bounds, counts and token counts are CLIENT_ERRORs naming the problem."""
        bad = {
            b"xdigest 0A 0 9 16\r\n": b"placement",
            b"xdigest ab 0 4294967296 16\r\n": b"32 bits",
            b"xdigest ab 9 0 16\r\n": b"ends before",
            b"xdigest ab 0 9 0\r\n": b"parts must be 1 to 256",
            b"xdigest ab 0 9 257\r\n": b"parts must be 1 to 256",
            b"xdigest ab 0 9\r\n": b"bad command line format",
            b"xdigest ab 0 9 16 bad/id\r\n": b"bad node id",
            b"xlist ab 0 9 0\r\n": b"limit must be 1 to 10000",
            b"xlist ab 0 9 10 5\r\n": b"bad command line format",
            b"xlist ab 0 9 10 -1 k\r\n": b"bad command line format",
        }
        for line, words in bad.items():
            (reply,) = replies(line)
            assert isinstance(reply, bytes) and reply.startswith(b"CLIENT_ERROR ") and words in reply, (line, reply)

    def test_replies(self) -> None:
        """DIGEST and XKEY lines read back into Digests and KeyVersions, whole and byte by byte; an error line
        is the error; a reply with more lines than asked for is refused."""
        digest = XDigest("ab", 0, 99, 2)
        listing = XList("ab", 0, 99, 3)
        digests = Digests((RangeDigest(3, 2**64 - 1), RangeDigest(0, 0)))
        keyed = KeyVersions(((5, b"k1", Version(9, "gw-1")), (6, b"k2", Version(10))))
        wire = (
            serialize_result(digest, digests)
            + serialize_result(listing, keyed)
            + b"SERVER_ERROR not synced to placement ab\r\n"
        )
        for chunk in (None, 1):
            got = read_replies(wire, [digest, listing, digest], chunk)
            assert got[:2] == [digests, keyed]
            assert isinstance(got[2], ServiceUnavailable) and "not synced" in str(got[2])
        with pytest.raises(BadReply):
            read_replies(b"DIGEST 1 1\r\nDIGEST 1 1\r\nDIGEST 1 1\r\nEND\r\n", [digest])
        with pytest.raises(BadReply):
            read_replies(b"XKEY 5 k1 nope!\r\nEND\r\n", [listing])


class EpochCommandTests:
    """xepoch: the epoch of the ring a handoff pushes the records that follow for."""

    def test_request_and_reply(self) -> None:
        """``xepoch <epoch>`` parses into XEpoch and back; its reply is OK, whole and byte by byte."""
        assert serialize_command(XEpoch(42)) == b"xepoch 42\r\n"
        assert one(b"xepoch 42\r\n") == XEpoch(42)
        for chunk in (None, 1):
            assert read_replies(b"OK\r\n", [XEpoch(42)], chunk) == [Status.OK]

    def test_bad_requests(self) -> None:
        """A missing, extra, negative, non-numeric or too large epoch is a CLIENT_ERROR."""
        for line in (
            b"xepoch\r\n",
            b"xepoch 1 2\r\n",
            b"xepoch -1\r\n",
            b"xepoch one\r\n",
            b"xepoch 9223372036854775808\r\n",
        ):
            (reply,) = replies(line)
            assert isinstance(reply, bytes) and reply.startswith(b"CLIENT_ERROR "), (line, reply)


class MapCommandTests:
    """xmap: the cluster map epoch a gateway routes by, and the kvstore's refusal of an older map's xapply."""

    def test_request_and_reply(self) -> None:
        """``xmap <epoch>`` parses into XMap and back, answered OK; bad epochs are CLIENT_ERRORs."""
        assert serialize_command(XMap(7)) == b"xmap 7\r\n"
        assert one(b"xmap 7\r\n") == XMap(7)
        for chunk in (None, 1):
            assert read_replies(b"OK\r\n", [XMap(7)], chunk) == [Status.OK]
        for line in (b"xmap\r\n", b"xmap 1 2\r\n", b"xmap -1\r\n", b"xmap 9223372036854775808\r\n"):
            (reply,) = replies(line)
            assert isinstance(reply, bytes) and reply.startswith(b"CLIENT_ERROR "), (line, reply)

    def test_stale_map_reply(self) -> None:
        """The refusal of an xapply of an older map reads back as StaleMap with both epochs."""
        line = error_reply(StaleMap(4, 9))
        assert line == b"SERVER_ERROR stale cluster map: epoch 4 is older than epoch 9 known here\r\n"
        error = error_from_reply(line[:-2])
        assert isinstance(error, StaleMap) and (error.sent, error.known) == (4, 9)


class FenceCommandTests:
    """xfence: the next xput is the copy of a read-modify-write's result, fenced by the epoch named."""

    def test_request_and_reply(self) -> None:
        """``xfence <epoch>`` parses into XFence and back, answered OK; the xput after it (only the next one,
        whatever comes between) carries the epoch; an xmove does not take it; bad epochs are CLIENT_ERRORs
        and leave none pending."""
        assert serialize_command(XFence(7)) == b"xfence 7\r\n"
        record = Record(b"v", 0, 0, Version(100, "gw"))
        put = serialize_command(XPut(b"k", record, epoch=7))
        assert put == serialize_command(XPut(b"k", record))  # the epoch goes as the xfence before it
        for chunk in (None, 1):
            fenced = events(b"xfence 7\r\n" + put + put, chunk)
            assert fenced == [XFence(7), XPut(b"k", record, epoch=7), XPut(b"k", record)]
        move = serialize_command(XPut(b"k", record, handoff=True))
        assert events(b"xfence 7\r\nget k\r\n" + move + put) == [
            XFence(7),
            Get((b"k",)),
            XPut(b"k", record, handoff=True),
            XPut(b"k", record, epoch=7),
        ]
        assert events(b"xfence 7\r\nxput k 0\r\n" + put)[2] == XPut(b"k", record)  # a bad xput takes it
        for chunk in (None, 1):
            assert read_replies(b"OK\r\n", [XFence(7)], chunk) == [Status.OK]
        for line in (b"xfence\r\n", b"xfence 1 2\r\n", b"xfence -1\r\n", b"xfence 9223372036854775808\r\n"):
            reply = replies(b"xfence 3\r\n" + line)[1]
            assert isinstance(reply, bytes) and reply.startswith(b"CLIENT_ERROR "), (line, reply)
            assert events(b"xfence 3\r\n" + line + put)[2] == XPut(b"k", record)


class LeaseCommandTests:
    """xlease (a read-modify-write's read, which leases the key) and xdeadline (its next store's round)."""

    def test_xlease(self) -> None:
        """``xlease <key> <holder> <deadline> <s|x>`` parses into XLease and back; its reply is xget's (one
        record or none); bad lines are CLIENT_ERRORs."""
        shared, exclusive = Lease("gw1:7", 1_700_000_002_000), Lease("gw1:8", 1_700_000_002_500, True)
        assert serialize_command(XLease(b"k", shared)) == b"xlease k gw1:7 1700000002000 s\r\n"
        assert serialize_command(XLease(b"k", exclusive)) == b"xlease k gw1:8 1700000002500 x\r\n"
        for chunk in (None, 1):
            wire = serialize_command(XLease(b"k", shared)) + serialize_command(XLease(b"k", exclusive))
            assert events(wire, chunk) == [XLease(b"k", shared), XLease(b"k", exclusive)]
        record = Record(b"v", 3, 0, Version(100, "gw"))
        assert serialize_result(XLease(b"k", shared), Values(((b"k", record),))) == (
            b"XVALUE k 3 0 100-gw 0 1\r\nv\r\nEND\r\n"
        )
        for chunk in (None, 1):
            answer = b"XVALUE k 3 0 100-gw 0 1\r\nv\r\nEND\r\nEND\r\n"
            assert read_replies(answer, [XLease(b"k", shared)] * 2, chunk) == [Values(((b"k", record),)), Values(())]
        for line in (
            b"xlease k gw1:7 1 s x\r\n",
            b"xlease k gw1:7 1 y\r\n",
            b"xlease k gw1:7 -1 s\r\n",
            b"xlease k gw 1:7 1\r\n",
            b"xlease k gw\x01 1 s\r\n",
            b"xlease k gw1:7 9223372036854775808 s\r\n",
            b"xlease " + b"k" * 251 + b" gw1:7 1 s\r\n",
        ):
            (reply,) = replies(line)
            assert isinstance(reply, bytes) and reply.startswith(b"CLIENT_ERROR "), (line, reply)

    def test_xrelease(self) -> None:
        """``xrelease <key> <holder> <deadline> [<floor>]`` parses into XRelease and back (answered OK); bad lines
        are CLIENT_ERRORs."""
        plain, floored = XRelease(b"k", "gw1:7", 1_700_000_002_000), XRelease(b"k", "gw1:8", 1_700_000_002_500, 123)
        assert serialize_command(plain) == b"xrelease k gw1:7 1700000002000\r\n"
        assert serialize_command(floored) == b"xrelease k gw1:8 1700000002500 123\r\n"
        for chunk in (None, 1):
            assert events(serialize_command(plain) + serialize_command(floored), chunk) == [plain, floored]
        assert serialize_result(plain, Status.OK) == b"OK\r\n"
        assert read_replies(b"OK\r\n", [plain]) == [Status.OK]
        for line in (
            b"xrelease k gw1:7\r\n",
            b"xrelease k gw1:7 1 2 3\r\n",
            b"xrelease k gw1:7 -1\r\n",
            b"xrelease k gw1:7 1 x\r\n",
            b"xrelease k gw\x01 1\r\n",
            b"xrelease k gw1:7 9223372036854775808\r\n",
            b"xrelease " + b"k" * 251 + b" gw1:7 1\r\n",
        ):
            (reply,) = replies(line)
            assert isinstance(reply, bytes) and reply.startswith(b"CLIENT_ERROR "), (line, reply)

    def test_xdeadline_stamps_the_next_store(self) -> None:
        """``xdeadline <holder> <deadline> <s|x>`` parses into XDeadline (answered OK); the next xapply or xput
        (not an xmove), whatever comes between, carries its lease; a bad line leaves none pending."""
        lease = Lease("gw1:7", 1_700_000_002_000, True)
        line = serialize_command(XDeadline(lease))
        assert line == b"xdeadline gw1:7 1700000002000 x\r\n"
        record = Record(b"v", 0, 0, Version(100, "gw"))
        put = serialize_command(XPut(b"k", record, lease=lease))
        assert put == serialize_command(XPut(b"k", record))  # the lease goes as the xdeadline before it
        apply = serialize_command(XApply(Version(100, "gw"), Arith(b"n", 1)))
        inline = serialize_command(XApply(Version(100, "gw"), Arith(b"n", 1, exptime=5), lease=lease))
        assert inline == b"xapply 100-gw incr n 1 ~L1700000002000xgw1:7,T5\r\n"  # the lease in the token
        assert events(inline) == [XApply(Version(100, "gw"), Arith(b"n", 1, exptime=5), lease=lease)]
        bad = b"xapply 100-gw incr n 1 ~L17x\r\n"
        assert replies(bad) == [b"CLIENT_ERROR bad xapply extension\r\n"]
        for chunk in (None, 1):
            assert events(line + b"get k\r\n" + put + put, chunk) == [
                XDeadline(lease),
                Get((b"k",)),
                XPut(b"k", record, lease=lease),
                XPut(b"k", record),
            ]
            assert events(line + b"xfence 3\r\n" + apply + apply, chunk) == [
                XDeadline(lease),
                XFence(3),
                XApply(Version(100, "gw"), Arith(b"n", 1), lease=lease),
                XApply(Version(100, "gw"), Arith(b"n", 1)),
            ]
        move = serialize_command(XPut(b"k", record, handoff=True))
        assert events(line + move + put)[1:] == [XPut(b"k", record, handoff=True), XPut(b"k", record, lease=lease)]
        assert read_replies(b"OK\r\n", [XDeadline(lease)]) == [Status.OK]
        for bad in (b"xdeadline gw1:7 1\r\n", b"xdeadline gw1:7 x s\r\n", b"xdeadline gw1:7 1 s s\r\n"):
            reply = replies(line + bad)[1]
            assert isinstance(reply, bytes) and reply.startswith(b"CLIENT_ERROR "), (bad, reply)
            assert events(line + bad + put)[2] == XPut(b"k", record)

    def test_refusals_read_back(self) -> None:
        """KeyLeased and DeadlinePassed go as SERVER_ERROR lines and read back with their times."""
        line = error_reply(KeyLeased(1_700_000_002_500))
        assert line == b"SERVER_ERROR key leased by another read-modify-write until 1700000002500\r\n"
        error = error_from_reply(line[:-2])
        assert isinstance(error, KeyLeased) and error.until == 1_700_000_002_500
        for refusal in (
            DeadlinePassed(1_700_000_002_000),
            DeadlinePassed(1_700_000_002_000, ": the version 5 is past it"),
        ):
            error = error_from_reply(error_reply(refusal)[:-2])
            assert isinstance(error, DeadlinePassed) and error.deadline == 1_700_000_002_000
            assert str(error) == str(refusal)


class ReplyParserTests:
    """The client reads replies given the commands it sent."""

    def test_spliced_get(self) -> None:
        """A SplicedGet's reply comes back as its bytes (a miss, a value block with CRLFs in it), whole and byte
        by byte; an error line is its error."""
        data = b"VALUE k 3 5\r\na\r\nbc\r\nEND\r\nEND\r\nSERVER_ERROR out of memory\r\n"
        sent: list[Any] = [SplicedGet(b"k"), SplicedGet(b"z"), SplicedGet(b"m")]
        for chunk in (None, 1):
            first, second, third = read_replies(data, sent, chunk)
            assert (first, second) == (b"VALUE k 3 5\r\na\r\nbc\r\nEND\r\n", b"END\r\n")
            assert isinstance(third, DomainError) and "out of memory" in str(third)
        assert serialize_command(SplicedGet(b"k")) == b"get k\r\n"

    @pytest.mark.parametrize(
        "data",
        [
            b"VALUE k 0 1\r\nxEND\r\n",
            b"VALUE k 0 x\r\n",
            b"VALUE k 0 1 9\r\nx\r\nEND\r\n",
            b"VALUE k 0 1\r\nx\r\nVALUE",
        ],
    )
    def test_spliced_get_refuses_what_is_not_one_value(self, data: bytes) -> None:
        """A block not followed by END, a bad length, a cas field or a second value is a BadReply."""
        parser = ReplyParser(max_value_size=1000)
        parser.feed(data + b"\r\n" * 8)
        with pytest.raises(BadReply):
            parser.next(SplicedGet(b"k"))

    def test_pipelined_replies(self) -> None:
        """Replies of every kind, in order, whole and byte by byte."""
        sent: list[Command] = [
            Store("set", b"k", 0, 0, b"x"),
            Get((b"k", b"j"), cas=True),
            Arith(b"k", 1),
            Arith(b"n", 1),
            Delete(b"k"),
            XGet((b"k",)),
            XApply(Version(8, "g"), Arith(b"k", 1)),
            XApply(Version(8, "g"), Touch(b"k", 1)),
            StatsCommand(),
            FlushAll(),
            Get((b"z",)),
        ]
        data = (
            b"STORED\r\nVALUE k 3 5 77\r\na\r\nbc\r\nVALUE j 0 0 4\r\n\r\nEND\r\n2\r\nNOT_FOUND\r\nDELETED\r\n"
            b"XVALUE k 0 0 77-w 1 0\r\n\r\nEND\r\n"
            b"XAPPLIED 3\r\nXVALUE k 1 2 8-g 0 1\r\n3\r\nEND\r\n"
            b"XAPPLIED NOT_FOUND\r\nEND\r\n"
            b"STAT pid 12\r\nSTAT version 1 2\r\nEND\r\nOK\r\nEND\r\n"
        )
        expected = [
            Status.STORED,
            Values(((b"k", Record(b"a\r\nbc", 3, 0, Version(77))), (b"j", Record(b"", 0, 0, Version(4))))),
            Number(2),
            Status.NOT_FOUND,
            Status.DELETED,
            Values(((b"k", Record(b"", 0, 0, Version(77, "w"), True)),)),
            XApplied(Number(3), Record(b"3", 1, 2, Version(8, "g"))),
            XApplied(Status.NOT_FOUND, None),
            StatsResult((("pid", "12"), ("version", "1 2"))),
            Status.OK,
            Values(()),
        ]  # fmt: skip
        assert read_replies(data, sent) == expected
        assert read_replies(data, sent, chunk=1) == expected

    def test_error_replies(self) -> None:
        """Error lines come back as the domain errors they stand for."""
        sent: list[Command] = [
            Arith(b"k", 1),
            Store("set", b"k", 0, 0, b"x"),
            Get((b"k",)),
            Delete(b"k"),
            Touch(b"k", 1),
        ]
        data = (
            b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
            b"SERVER_ERROR object too large for cache\r\n"
            b"ERROR\r\n"
            b"SERVER_ERROR this node is leaving the ring and refuses writes\r\n"
            b"CLIENT_ERROR bad data chunk\r\n"
        )  # fmt: skip
        got = read_replies(data, sent)
        assert [type(e) for e in got] == [NonNumericValue, ValueTooLarge, UnknownCommand, NodeLeaving, BadDataChunk]
        assert str(got[1]) == "object too large for cache"
        assert isinstance(error_from_reply(b"CLIENT_ERROR whatever"), BadCommand)
        assert type(error_from_reply(b"SERVER_ERROR busy")) is ServiceUnavailable
        assert error_from_reply(b"STORED") is None
        # An xapply refused over a newer record: the gateway learns the stored version and retries past it.
        stale = error_from_reply(error_reply(StaleVersion(Version(77, "gw-2"))).rstrip(b"\r\n"))
        assert type(stale) is StaleVersion and stale.stored == Version(77, "gw-2")
        stale = error_from_reply(b"SERVER_ERROR " + StaleVersion.MESSAGE.encode() + b": not-a-version")
        assert type(stale) is StaleVersion and stale.stored is None

    def test_bad_replies_raise(self) -> None:
        """A reply that does not parse raises BadReply."""
        cases: list[tuple[Command, bytes]] = [
            (Delete(b"k"), b"WHAT\r\n"),
            (Get((b"k",)), b"VALUE k x 1\r\nx\r\nEND\r\n"),
            (Get((b"k",)), b"VALUE k 0 1\r\nxyz\r\nEND\r\n"),
            (Get((b"k",)), b"VALUE k 0 1\r\nx\r\nSTORED\r\n"),
            (XGet((b"k",)), b"XVALUE k 0 0 v 0 1\r\nx\r\nEND\r\n"),
            (XVer(b"k"), b"XVER not-a-version!\r\n"),
            (XVer(b"k"), b"VALUE k 0 1\r\n"),
            (Arith(b"k", 1), b"x" * 5000),
            (Get((b"k",)), b"VALUE k 0 5000\r\n"),
            (XApply(Version(1), Delete(b"k")), b"XAPPLIED WHAT\r\nEND\r\n"),
        ]
        for command, data in cases:
            parser = ReplyParser(max_value_size=1000)
            parser.feed(data)
            with pytest.raises(BadReply):
                parser.next(command)

    def test_version_reply(self) -> None:
        """The version reply reads as a one-item StatsResult."""
        assert read_replies(b"VERSION 1.6.18\r\n", [VersionCommand()]) == [StatsResult((("version", "1.6.18"),))]


records = st.builds(
    Record,
    st.binary(max_size=30) | st.sampled_from([b"\r\nEND\r\n", b"END\r\n", b"XVALUE k 0 0 1 0 1\r\n"]),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**40),
    st.builds(Version, st.integers(0, 2**63 - 1), st.sampled_from(["", "gw-1", "g"])),
    st.booleans(),
)


class XVerTests:
    """xver, the version-only read of a gateway's quorum reads: request, reply, and a server without it."""

    def test_request(self) -> None:
        """``xver <key>`` parses into XVer; without a key, or with more than one, it is an unknown command."""
        assert events(b"xver k\r\nxver\r\nxver a b\r\n") == [XVer(b"k"), rej(UnknownCommand()), rej(UnknownCommand())]
        assert serialize_command(XVer(b"k")) == b"xver k\r\n"

    def test_replies(self) -> None:
        """XVER <version> or END, whole and byte by byte; ERROR (an earlier kvstore) is its error."""
        sent: list[Command] = [XVer(b"k"), XVer(b"j"), XVer(b"x")]
        data = serialize_result(XVer(b"k"), VersionOf(Version(77, "w"))) + serialize_result(XVer(b"j"), VersionOf(None))
        assert data == b"XVER 77-w\r\nEND\r\n"
        expected = [VersionOf(Version(77, "w")), VersionOf(None), UnknownCommand()]
        for chunk in (None, 1):
            got = read_replies(data + b"ERROR\r\n", sent, chunk=chunk)
            assert got[:2] == expected[:2] and type(got[2]) is UnknownCommand


class XGetReplyTests:
    """The replies to xget, which the gateway reads on every get (read in one go when they are whole)."""

    @settings(max_examples=200, deadline=None)
    @given(st.lists(records, max_size=3), st.integers(1, 9))
    def test_round_trip(self, stored: list[Record], chunk: int) -> None:
        """What the server serializes reads back the same, whole, in pieces, and followed by more replies."""
        keys = tuple(b"k%d" % i for i in range(len(stored))) or (b"k",)
        answer = Values(tuple(zip(keys, stored)))
        data = serialize_result(XGet(keys), answer)
        sent: list[Command] = [XGet(keys), Delete(b"k"), XGet(keys)]
        replies = data + b"DELETED\r\n" + data
        expected = [answer, Status.DELETED, answer]
        assert read_replies(replies, sent) == expected
        assert read_replies(replies, sent, chunk=chunk) == expected

    def test_common_replies_read_in_one_go(self) -> None:
        """END and one whole XVALUE block are read by the one-go path; two records are left to the general one."""
        parser = ReplyParser(max_value_size=1000)
        parser.feed(b"END\r\nXVALUE k 1 2 5-g 1 0\r\n\r\nEND\r\nXVALUE a 0 0 1 0 0\r\n\r\nXVALUE b 0 0 1 0 0\r\n")
        assert parser._xget_reply() == Values(())
        assert parser._xget_reply() == Values(((b"k", Record(b"", 1, 2, Version(5, "g"), True)),))
        assert parser._xget_reply() is None
        parser.feed(b"\r\nEND\r\n")
        assert parser.next(XGet((b"a", b"b"))) == Values(
            ((b"a", Record(b"", 0, 0, Version(1))), (b"b", Record(b"", 0, 0, Version(1))))
        )

    def test_incomplete_reply_waits(self) -> None:
        """A one-record reply without its END yet is not read until the rest comes."""
        parser = ReplyParser(max_value_size=1000)
        parser.feed(b"XVALUE k 0 0 5-g 0 3\r\nabc\r\nEN")
        assert parser.next(XGet((b"k",))) is None
        parser.feed(b"D\r\n")
        assert parser.next(XGet((b"k",))) == Values(((b"k", Record(b"abc", 0, 0, Version(5, "g"))),))
        assert parser.buffered == 0

    def test_bad_one_record_replies_raise(self) -> None:
        """A reply shaped like the common case but wrong still raises BadReply."""
        for data in (
            b"XVALUE k 0 0 1 2 1\r\nx\r\nEND\r\n",  # tombstone neither 0 nor 1
            b"XVALUE k 0 0 1 0 3\r\nx\r\nEND\r\n",  # shorter data block than announced
            b"XVALUE k 0 0 1 0 2000\r\n" + b"x" * 2000 + b"\r\nEND\r\n",  # over max_value_size
            b"XVALUE k 0 0 99999999999999999999999 0 1\r\nx\r\nEND\r\n",  # clock over 64 bits
            b"XVALUE k x 0 1 0 1\r\nx\r\nEND\r\n",
        ):
            parser = ReplyParser(max_value_size=1000)
            parser.feed(data)
            with pytest.raises(BadReply):
                parser.next(XGet((b"k",)))


fragments = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"get ", b"gets ", b"gat ", b"set ", b"cas ", b"incr ", b"delete ", b"touch ", b"xput ",
                         b"xapply 5-g ", b"flush_all ", b"noreply", b" ", b"\r\n", b"\n", b"\0", b"-1", b"99999999999",
                         b"0 0 3", b"k", b"\x80", b"HTTP/1.1", b"stats", b"quit"]),
    ),
    max_size=30,
)  # fmt: skip


class FuzzTests:
    """Whatever bytes come, the parser answers with commands or rejections and never raises."""

    @settings(max_examples=500)
    @given(fragments, st.integers(1, 16))
    def test_any_bytes(self, parts: list[bytes], chunk: int) -> None:
        """Arbitrary input, fed in arbitrary pieces, yields only commands and FailedRequest, and stays bounded."""
        data = b"".join(parts)
        parser = RequestParser(max_value_size=64, max_line=128, max_keys=8)
        for i in range(0, len(data), chunk):
            parser.feed(data[i : i + chunk])
            for _ in range(len(data) + 2):
                event = parser.next()
                if event is None:
                    break
                assert isinstance(event, FailedRequest) or type(event).__module__ == "chashd.commands"
            else:
                raise AssertionError("the parser did not stop")
            assert parser.buffered <= max(parser.max_get_line, 64 + 2) + chunk
