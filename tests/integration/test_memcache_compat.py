"""The kvstore's line protocol against a real memcached: the same bytes, the same replies.

A differential test: every case sends the same byte sequence, on a fresh connection, to memcached 1.6
(Debian's package, started here on a free loopback port with ``-U 0 -t 1``) and to the kvstore's line
protocol (``MemcacheServerFactory`` over ``LocalBackend`` and a ``MemoryEngine`` bounded at 64 MiB as memcached's
``-m 64`` is, served in this process
by the real reactor on a real loopback socket), then compares the replies byte for byte. Only what
differs by nature is normalised: cas uniques (memcached counts, we use versions) and the version string.
Each case starts from an empty store (``flush_all`` on both first).

Known memcached behaviours we do not copy, so no case here sends them: the meta flags b, h and l (refused,
saying so), the fields of ``me`` about an item (ours are our own), a cas lower than the item's (``ms`` with
C and I: memcached's cas values count from 1, ours are versions), a pipelined ``get`` whose key is too long
dropping the replies queued before it, an
``incr``/``decr`` pipelined right behind a ``get`` of the same key not padding the new number (the
pending reply holds a reference to the item, so memcached allocates a new one), and ``lru_crawler metadump``
refusing commands pipelined before it (``ERROR cannot pipeline other commands before metadump``) and
dropping those pipelined after it (we run both, in order), and ``lru_crawler crawl`` and ``enable``
answering ``BUSY`` or an error while its crawler runs (ours has no crawler: always OK).

Then pymemcache, a real memcached client, runs the common operations against the kvstore.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
from pymemcache.client.base import Client
from twisted.internet.threads import deferToThread

from chashd.kvstore.backend import LocalBackend
from chashd.memcache.server import MemcacheServerFactory
from chashd.storage.memory import MemoryEngine

pytestmark = pytest.mark.slow

MAX_VALUE = 1024 * 1024
IDLE = 0.3  # seconds without bytes after which a server is taken to have said all it will
TIMEOUT = 10.0


# -- the two servers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kvstore_port() -> Iterator[int]:
    """The kvstore's line protocol over the memory engine, served by the real reactor on loopback."""
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    backend = LocalBackend(MemoryEngine(limit_bytes=64 * 1024 * 1024), "kv-compat", reactor, MAX_VALUE)
    factory = MemcacheServerFactory(backend, reactor, max_value_size=MAX_VALUE, idle_timeout=0)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield port.getHost().port
    port.stopListening()


# -- talking to a server with blocking sockets (run in a thread while the reactor serves) -----------


def read_reply(sock: socket.socket, until: Callable[[bytes], bool] | None) -> tuple[bytes, bool]:
    """Read until ``until(data)`` holds, the peer closes, or (without ``until``) it is idle; (data, closed)."""
    data = b""
    deadline = time.monotonic() + TIMEOUT
    sock.settimeout(IDLE if until is None else 0.2)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            if until is None:
                return data, False
            continue
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
        if until is not None and until(data):
            return data, False
    raise AssertionError(f"no complete reply within {TIMEOUT}s; got {data[:200]!r}")


SENTINEL = b"version\r\n"


def ends_with_version(data: bytes) -> bool:
    return re.search(rb"VERSION [^\r\n]*\r\n$", data) is not None


@dataclass
class Case:
    """Bytes to send (each chunk in its own write, ``pause`` seconds apart) and how the reply ends."""

    name: str
    chunks: list[bytes]
    ends: str = "sentinel"  # sentinel: a `version` after the case marks the end; close: the server closes;
    # idle: the server waits for more bytes
    pause: float = 0.0
    setup: list[bytes] = field(default_factory=list)


def run_case(port: int, case: Case) -> tuple[bytes, bool]:
    """Send a case to one server on a fresh connection (after its setup); the normalised reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"flush_all\r\n" + b"".join(case.setup) + SENTINEL)
        read_reply(sock, ends_with_version)
        for i, chunk in enumerate(case.chunks):
            if i and case.pause:
                time.sleep(case.pause)
            sock.sendall(chunk)
        if case.ends == "sentinel":
            sock.sendall(SENTINEL)
            # the case's own `version` commands answer VERSION lines too: wait for one more than those
            versions = sum(chunk.count(b"version") for chunk in case.chunks) + 1
            data, closed = read_reply(sock, lambda d: ends_with_version(d) and d.count(b"VERSION ") >= versions)
            data = data[: data.rindex(b"VERSION ")]
        elif case.ends == "close":
            data, closed = read_reply(sock, lambda _: False)
        else:
            data, closed = read_reply(sock, None)
    return normalise(data), closed


def normalise(data: bytes) -> bytes:
    """Hide what differs by nature: cas uniques (classic and meta), version strings, and the TTLs meta commands
    report (the two servers' clocks may tick their second apart; the exact TTLs are checked in
    tests/unit/test_memcache_meta.py)."""
    data = re.sub(rb"(VALUE \S+ \d+ \d+) \d+\r\n", rb"\1 <cas>\r\n", data)
    data = re.sub(rb"^(?:VA \d+|HD|NS|EX|NF)(?: [^\r\n]*)?(?=\r\n)", _meta_flags, data, flags=re.M)
    return re.sub(rb"VERSION [^\r\n]*\r\n", b"VERSION <v>\r\n", data)


def _meta_flags(match: re.Match[bytes]) -> bytes:
    return re.sub(rb" t[1-9]\d*(?= |$)", b" t<ttl>", re.sub(rb" c\d+(?= |$)", b" c<cas>", match.group(0)))


def gets_cas(port: int, key: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"gets " + key + b"\r\n")
        data, _ = read_reply(sock, lambda d: d.endswith(b"END\r\n"))
    return int(data.split(b"\r\n")[0].split(b" ")[4])


# -- the cases ---------------------------------------------------------------------------------------------

K251 = b"k" * 251
BIG = b"x" * (2 * MAX_VALUE)

CASES = [
    # storage and retrieval
    Case("set get", [b"set k 5 0 3\r\nabc\r\nget k\r\n"]),
    Case("flags round trip", [b"set k 4294967295 0 1\r\nx\r\nget k\r\nset j 4294967296 0 1\r\ny\r\nget j\r\n"]),
    Case("value holding CRLF", [b"set k 0 0 8\r\na\r\nb\r\n\r\n\r\nget k\r\n"]),
    Case("empty value", [b"set k 0 0 0\r\n\r\nget k\r\n"]),
    Case("binary value", [b"set k 0 0 6\r\n\x00\x01\xff\r\x00\n\r\nget k\r\n"]),
    Case("get several keys", [b"set a 1 0 1\r\n1\r\nset b 2 0 1\r\n2\r\nget a x b a\r\n"]),
    Case("gets", [b"gets nothing\r\n"], setup=[b"set k 0 0 1\r\nx\r\n"]),
    Case("gets shows a cas", [b"gets k\r\n"], setup=[b"set k 0 0 1\r\nx\r\n"]),
    Case("add", [b"add k 0 0 1\r\n1\r\nadd k 0 0 1\r\n2\r\nget k\r\n"]),
    Case("replace", [b"replace k 0 0 1\r\n1\r\nset k 0 0 1\r\n1\r\nreplace k 7 0 1\r\n2\r\nget k\r\n"]),
    Case(
        "append prepend",
        [
            b"append k 0 0 1\r\nx\r\nprepend k 0 0 1\r\nx\r\n",
            b"set k 3 0 1\r\nm\r\nappend k 9 0 2\r\n>>\r\nprepend k 9 0 2\r\n<<\r\nget k\r\n",
        ],
    ),  # fmt: skip
    Case("cas missing and wrong", [b"cas k 0 0 1 1\r\nx\r\nset k 0 0 1\r\nx\r\ncas k 0 0 1 0\r\ny\r\n"]),
    Case("delete", [b"delete k\r\nset k 0 0 1\r\nx\r\ndelete k\r\nget k\r\ndelete k 0\r\n"]),
    Case("delete hold", [b"delete k 1\r\ndelete k x y\r\ndelete k 0 noreply\r\ndelete k noreply\r\n"]),
    Case("incr decr", [b"incr k 1\r\nset k 0 0 2\r\n10\r\nincr k 5\r\ndecr k 3\r\nget k\r\n"]),
    Case(
        "decr keeps the length",
        [b"decr k 91\r\n", b"get k\r\n", b"incr k 1000\r\n", b"get k\r\n"],
        pause=0.02,
        setup=[b"set k 0 0 3\r\n100\r\n"],
    ),  # fmt: skip
    Case(
        "incr wraps", [b"incr k 2\r\n", b"get k\r\n"], pause=0.02, setup=[b"set k 0 0 20\r\n18446744073709551615\r\n"]
    ),
    Case("decr floor", [b"decr k 100\r\n"], setup=[b"set k 0 0 1\r\n5\r\n"]),
    Case(
        "incr number forms",
        [b"set a 0 0 2\r\n 5\r\nset b 0 0 2\r\n+5\r\nset c 0 0 3\r\n5\tx\r\nincr a 1\r\nincr b 1\r\nincr c 1\r\n"],
    ),  # fmt: skip
    Case(
        "incr non-numeric",
        [
            b"set k 0 0 3\r\nabc\r\nincr k 1\r\nset j 0 0 2\r\n-5\r\nincr j 1\r\n"
            b"set e 0 0 0\r\n\r\nincr e 1\r\nset o 0 0 20\r\n18446744073709551616\r\nincr o 1\r\n"
        ],
    ),  # fmt: skip
    Case("incr bad delta", [b"incr k -1\r\nincr k abc\r\ndecr k 18446744073709551616\r\n"]),
    Case("touch", [b"touch k 10\r\nset k 0 0 1\r\nx\r\ntouch k 10\r\ntouch k abc\r\nget k\r\n"]),
    Case("touch expires", [b"touch k -1\r\nget k\r\n"], setup=[b"set k 0 0 1\r\nx\r\n"]),
    Case("gat gats", [b"gat 100 k x\r\ngats 100 k\r\ngat abc k\r\ngat 10\r\n"], setup=[b"set k 3 0 1\r\nx\r\n"]),
    Case("gat with a past exptime", [b"gat -1 k\r\n", b"get k\r\n"], pause=0.02, setup=[b"set k 0 0 1\r\nx\r\n"]),
    Case("stats errors", [b"stats nonsense\r\nstats detail\r\n"]),
    Case(
        "stats groups and admin",
        [
            b"stats sizes\r\nstats cachedump\r\nstats cachedump 1\r\nstats cachedump x y\r\n"
            b"stats cachedump 99 1\r\nstats reset\r\nshutdown\r\nshutdown graceful\r\nshutdown now\r\n"
        ],
    ),  # fmt: skip
    Case(
        "cache_memlimit",
        [
            b"cache_memlimit\r\ncache_memlimit 50\r\ncache_memlimit 5\r\ncache_memlimit abc\r\n"
            b"cache_memlimit 2000000000\r\ncache_memlimit 60 noreply\r\ncache_memlimit 64 x\r\n"
        ],
    ),  # fmt: skip
    Case("expired at once", [b"set k 0 -1 1\r\nx\r\nget k\r\nadd k 0 0 1\r\ny\r\nget k\r\n"]),
    Case("absolute past expiry", [b"set k 0 1000000000 1\r\nx\r\nget k\r\n"]),
    Case("flush_all", [b"set k 0 0 1\r\nx\r\nflush_all\r\nget k\r\nflush_all 0\r\nflush_all noreply\r\n"]),
    Case("flush_all delay", [b"set k 0 0 1\r\nx\r\nflush_all 100\r\nget k\r\nflush_all abc\r\nflush_all 1 2\r\n"]),
    Case("version", [b"version\r\nversion extra\r\n"]),
    Case("verbosity", [b"verbosity\r\nverbosity 1\r\nverbosity x\r\nverbosity 1 noreply\r\nverbosity 1 2 3\r\n"]),
    # noreply everywhere memcached takes it
    Case(
        "noreply",
        [
            b"set k 0 0 1 noreply\r\nx\r\nadd k 0 0 1 noreply\r\ny\r\nreplace k 0 0 1 noreply\r\nz\r\n"
            b"append k 0 0 1 noreply\r\na\r\nprepend k 0 0 1 noreply\r\np\r\nget k\r\n"
            b"set n 0 0 1 noreply\r\n1\r\nincr n 5 noreply\r\ndecr n 1 noreply\r\ntouch n 10 noreply\r\n"
            b"cas n 0 0 1 1 noreply\r\nx\r\nget n\r\ndelete n noreply\r\nget n\r\n"
        ],
    ),  # fmt: skip
    Case(
        "noreply silences errors",
        [b"incr k 1 noreply\r\nincr k x noreply\r\nset k x 0 1 noreply\r\nx\r\nset k 0 0 3 noreply\r\nabcde\r\n"],
    ),  # fmt: skip
    Case(
        "pipelining",
        [
            b"set a 0 0 1\r\n1\r\nset b 0 0 1\r\n2\r\nget a b\r\nappend a 0 0 1\r\n1\r\n"
            b"delete b\r\nget a b\r\nincr a 1\r\nbogus\r\nget a\r\n"
        ],
    ),  # fmt: skip
    Case("split across writes", [b"se", b"t k 0 0 7\r", b"\nab", b"c\r\nd", b"e\r\n", b"get", b" k\r\n"], pause=0.02),
    Case("bare LF", [b"set k 0 0 1\nx\r\nget k\n"]),
    Case("spaces", [b"  set   k 0 0 1  \r\nx\r\nget  k \r\n"]),
    Case(
        "numbers as C reads them",
        [
            b"set k +5 0 1\r\nx\r\nset j -0 0 01\r\ny\r\nset t 5\t 0 1\r\nz\r\n"
            b"set u 0 0 4294967297\r\nw\r\nget k j t u\r\n"
        ],
    ),  # fmt: skip
    Case("extra token ignored", [b"set k 0 0 1 foo\r\nx\r\nget k\r\n"]),
    # bad input
    Case("unknown command", [b"bogus\r\n\r\na\r\nGET k\r\nset\r\nget\r\ngets\r\n"]),
    Case(
        "wrong token counts",
        [b"set k 0 0\r\ncas k 0 0 1\r\nx\r\nincr k\r\ntouch k\r\ndelete\r\nset k 0 0 1 noreply extra\r\nx\r\n"],
    ),  # fmt: skip
    Case(
        "key too long",
        [
            b"get " + K251 + b"\r\n",
            b"set " + K251 + b" 0 0 1\r\nx\r\n",
            b"delete " + K251 + b"\r\n",
            b"incr " + K251 + b" 1\r\n",
            b"touch " + K251 + b" 1\r\n",
            b"gets a " + K251 + b"\r\n",
        ],
        pause=0.02,
    ),  # fmt: skip
    Case("key of 250 bytes", [b"set " + b"k" * 250 + b" 0 0 1\r\nx\r\nget " + b"k" * 250 + b"\r\n"]),
    Case(
        "key with control characters", [b"set a\x01b 0 0 1\r\nx\r\nget a\x01b\r\nset t\tk 0 0 1\r\ny\r\nget t\tk\r\n"]
    ),
    Case("NUL in a line", [b"set a\x00b 0 0 1\r\nx\r\nget k\x00junk\r\n"]),
    Case("data block too long", [b"set k 0 0 3\r\nabcde\r\nget k\r\n"]),
    Case("data block too short", [b"set k 0 0 3\r\nab\r\n", b"X\r\nget k\r\n"], pause=0.05),
    Case("data block without CRLF", [b"set k 0 0 1\r\nx\nget k\r\n"]),
    Case("negative length", [b"set k 0 0 -1\r\nab\r\n"]),
    Case(
        "bad numbers",
        [
            b"set k x 0 1\r\nx\r\nset k 5abc 0 1\r\nx\r\nset k -1 0 1\r\nx\r\n"
            b"set k 18446744073709551616 0 1\r\nx\r\ncas k 0 0 1 abc\r\nx\r\n"
        ],
    ),  # fmt: skip
    Case("value too large", [b"set k 0 0 %d\r\n" % len(BIG), BIG + b"\r\nget k\r\n"]),
    Case(
        "value too large deletes the old value",
        [b"set k 0 0 %d\r\n" % len(BIG) + BIG + b"\r\nget k\r\n"],
        setup=[b"set k 0 0 1\r\nx\r\n"],
    ),  # fmt: skip
    Case("value too large noreply", [b"set k 0 0 %d noreply\r\n" % len(BIG) + BIG + b"\r\nget k\r\n"]),
    Case("line too long closes", [b"x" * 3000], ends="close"),
    Case("long line in one write", [b"x" * 3000 + b"\r\n"]),
    Case("long set line", [b"set k 0 0 1 " + b"y" * 3000 + b"\r\nx\r\n"]),
    Case("long get line", [b"get " + b"k " * 2000, b"\r\n"], pause=0.05),
    Case("waiting under the limit", [b"x" * 2000], ends="idle"),
    Case("HTTP request closes", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"], ends="close"),
    # meta commands (the cas and TTL numbers they report are normalised: c<cas>, t<ttl>)
    Case(
        "meta get",
        [
            b"mn\r\nmg foo v\r\nmg foo v q\r\nmn\r\nms foo 3\r\nbar\r\nmg foo v\r\nmg foo v f t c k s Oabc\r\n"
            b"mg foo\r\nmg foo q\r\nmg foo k v q\r\nmg foo k Oab\r\nmg bar k Oab\r\nmg bar v O" + b"o" * 40 + b"\r\n"
        ],
    ),  # fmt: skip
    Case(
        "meta get errors",
        [
            b"mg\r\nmg foo zz\r\nmg foo v v\r\nmg foo Tx\r\nmg foo N\r\nmg "
            + K251
            + b" v\r\nmg k "
            + b"s " * 20
            + b"\r\n"
        ],
    ),  # fmt: skip
    Case(
        "meta vivify and recache",
        [
            b"mg foo N30 v c t\r\nmg foo N30 v c t\r\nmg foo v t T100\r\nmg foo t\r\nms foo 2 T0\r\nhi\r\n"
            b"mg foo R30 v t\r\nms foo 2 T10\r\nhi\r\nmg foo R30 v t\r\nmg foo R30 v t\r\nmg foo v\r\n"
        ],
    ),  # fmt: skip
    Case(
        "meta set",
        [
            b"ms k 2 MA\r\nhi\r\nms k 2 ME\r\nhi\r\nms k 2 ME\r\nyo\r\nms k 2 MA\r\n!!\r\nms k 2 MP\r\n<<\r\n"
            b"mg k v\r\nms k 1 MR\r\nr\r\nms j 1 MR\r\nr\r\nms k 1 MX\r\nx\r\nms k 1 F5 T100 c k Oop\r\nz\r\n"
            b"mg k v f t c\r\nms k 1 C1\r\nw\r\nms zz 1 C1\r\nw\r\nms k 1 MA C1\r\nw\r\nms k 1 q\r\nq\r\n"
            b"ms k 1 ME q\r\nq\r\nmn\r\n"
        ],
    ),  # fmt: skip
    Case(
        "meta set errors",
        [b"ms k abc\r\nx\r\nms k\r\nms k 1 Fabc\r\nx\r\nms k 1 T\r\nx\r\nms k 1 v v\r\nx\r\nms k 1 zz\r\nx\r\nmn\r\n"],
    ),  # fmt: skip
    Case(
        "meta set too large", [b"ms k %d T0\r\n" % len(BIG) + BIG + b"\r\nmg k v\r\n"], setup=[b"set k 0 0 1\r\nx\r\n"]
    ),
    Case(
        "meta delete",
        [
            b"md k\r\nmd k q\r\nmn\r\nms k 1\r\nx\r\nmd k q\r\nmn\r\nms k 1\r\nx\r\nmd k k Oz\r\nms k 1 c\r\nx\r\n"
            b"md k C1\r\nmd k I T30\r\nmg k v c t\r\nmg k v c t\r\nms k 1\r\ny\r\nmg k v\r\nmd k I\r\nmg k\r\n"
            b"md k C0 I\r\nmd k x\r\nmd k v v\r\n"
        ],
    ),  # fmt: skip
    Case(
        "meta arithmetic",
        [
            b"ma n\r\nma n q\r\nmn\r\nma n N0 J10 v\r\nma n v\r\nma n MD D3 v t c\r\nma n M- D100 v\r\nma n M+ D5\r\n"
            b"ma n MI v\r\nma n Mx\r\nma n D-1\r\nma n Dabc\r\nms s 3\r\nabc\r\nma s\r\nma n T100 v t\r\n"
            b"ma n C1 v\r\nma n v k Oq\r\nma n q\r\nmn\r\n"
        ],
    ),  # fmt: skip
    Case("meta no-op and debug miss", [b"mn\r\nmn extra\r\nme k\r\nme " + K251 + b"\r\nme\r\n"]),
    # lru_crawler's answers (metadump, which memcached refuses pipelined: tests/unit/test_memcache_server.py, and
    # memcached-tool's keys and dump in tests/integration/test_libmemcached_tools.py)
    Case(
        "lru_crawler",
        [
            b"lru_crawler crawl 64\r\nlru_crawler crawl\r\nlru_crawler sleep 10\r\nlru_crawler sleep 2000000\r\n"
            b"lru_crawler sleep x\r\nlru_crawler tocrawl -1\r\nlru_crawler bogus\r\nlru_crawler\r\n"
        ],
    ),  # fmt: skip
    Case("quit", [b"set k 0 0 1\r\nx\r\nquit\r\nget k\r\n"], ends="close"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest_twisted.inlineCallbacks
def test_same_replies(case: Case, memcached_port: int, kvstore_port: int) -> Any:
    """The kvstore answers ``case`` byte for byte as memcached does (and closes when it closes)."""
    expected = yield deferToThread(run_case, memcached_port, case)
    got = yield deferToThread(run_case, kvstore_port, case)
    assert got == expected


def cas_session(port: int) -> list[bytes]:
    """gets, then cas with the unique it gave (twice: the second is EXISTS), over one connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"flush_all\r\nset k 0 0 1\r\nx\r\n")
        read_reply(sock, lambda d: d == b"OK\r\nSTORED\r\n")
    unique = gets_cas(port, b"k")
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        for value in (b"y", b"z"):
            sock.sendall(b"cas k 0 0 1 %d\r\n%s\r\n" % (unique, value))
            replies.append(read_reply(sock, lambda d: d.endswith(b"\r\n"))[0])
        sock.sendall(b"get k\r\n")
        replies.append(read_reply(sock, lambda d: d.endswith(b"END\r\n"))[0])
    return replies


@pytest_twisted.inlineCallbacks
def test_cas_with_the_unique_from_gets(memcached_port: int, kvstore_port: int) -> Any:
    """cas with the unique gets gave stores once, then EXISTS, on both servers."""
    expected = yield deferToThread(cas_session, memcached_port)
    got = yield deferToThread(cas_session, kvstore_port)
    assert expected == [b"STORED\r\n", b"EXISTS\r\n", b"VALUE k 0 1\r\ny\r\nEND\r\n"]
    assert got == expected


def stats_names(port: int) -> tuple[bytes, set[bytes]]:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"stats\r\n")
        data, _ = read_reply(sock, lambda d: d.endswith(b"END\r\n"))
    lines = data.split(b"\r\n")
    return lines[-2], {line.split(b" ")[1] for line in lines[:-2] if line.startswith(b"STAT ")}


@pytest_twisted.inlineCallbacks
def test_stats_shape(memcached_port: int, kvstore_port: int) -> Any:
    """stats answers STAT lines and END on both, with memcached's common names."""
    end, theirs = yield deferToThread(stats_names, memcached_port)
    our_end, ours = yield deferToThread(stats_names, kvstore_port)
    assert end == our_end == b"END"
    common = {b"pid", b"uptime", b"time", b"version", b"curr_connections", b"total_connections",
              b"rejected_connections", b"cmd_get", b"get_hits", b"get_misses", b"cmd_set", b"curr_items",
              b"delete_hits", b"incr_hits", b"touch_hits", b"cas_hits", b"cmd_flush", b"cmd_touch"}  # fmt: skip
    assert common <= theirs
    assert common <= ours


# -- a real client -----------------------------------------------------------------------------------------


class FlagsSerde:
    """Keeps the flags pymemcache reads, so a test can see them round-trip."""

    def __init__(self) -> None:
        self.flags_seen: list[int] = []

    def serialize(self, key: Any, value: Any) -> tuple[bytes, int]:
        if isinstance(value, tuple):
            return value[0], value[1]
        return value, 0

    def deserialize(self, key: Any, value: bytes, flags: int) -> Any:
        self.flags_seen.append(flags)
        return value


def pymemcache_session(port: int) -> None:
    serde = FlagsSerde()
    client = Client(("127.0.0.1", port), serde=serde, connect_timeout=5, timeout=TIMEOUT)
    try:
        assert client.set("k", b"v", noreply=False) is True
        assert client.get("k") == b"v"
        assert client.set("f", (b"flagged", 12345), noreply=False) is True
        assert client.get("f") == b"flagged" and serde.flags_seen[-1] == 12345
        value, cas = client.gets("k")
        assert value == b"v" and cas
        assert client.cas("k", b"w", cas, noreply=False) is True
        assert client.cas("k", b"x", cas, noreply=False) is False
        assert client.get("k") == b"w"
        assert client.set("n", b"10", noreply=False)
        assert client.incr("n", 5) == 15
        assert client.decr("n", 20) == 0
        assert client.incr("missing", 1) is None
        assert client.append("k", b"++", noreply=False) is True
        assert client.prepend("k", b"--", noreply=False) is True
        assert client.get("k") == b"--w++"
        assert client.add("k", b"no", noreply=False) is False
        assert client.replace("k", b"yes", noreply=False) is True
        assert client.touch("k", 100, noreply=False) is True
        assert client.touch("missing", 100, noreply=False) is False
        many = {f"key{i}": b"%d" % i for i in range(50)}
        assert client.set_many(many, noreply=False) == []
        assert client.get_many([*many, "absent"]) == many
        assert client.delete("k", noreply=False) is True
        assert client.delete("k", noreply=False) is False
        assert client.get("k") is None
        client.set("quiet", b"1")  # noreply by default in pymemcache
        assert client.get("quiet") == b"1"
        assert client.version()
        assert b"curr_connections" in {k if isinstance(k, bytes) else k.encode() for k in client.stats()}
        client.flush_all(noreply=False)
        assert client.get("f") is None
    finally:
        client.close()


@pytest_twisted.inlineCallbacks
def test_pymemcache(kvstore_port: int) -> Any:
    """pymemcache's common operations work against the kvstore, flags included."""
    yield deferToThread(pymemcache_session, kvstore_port)


@pytest_twisted.inlineCallbacks
def test_pymemcache_against_memcached(memcached_port: int) -> Any:
    """The same session passes against memcached (so the session itself is right)."""
    yield deferToThread(pymemcache_session, memcached_port)
