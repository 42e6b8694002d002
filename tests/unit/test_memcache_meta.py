"""memcached's meta commands on the line protocol (chashd.memcache.meta), over a kvstore's backend answered at
once and over a backend that answers later (a gateway's shape), on StringTransport."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.task import Clock

from chashd.commands import Arith, Delete, MetaCommand, Number, Status, Store, XApply
from chashd.kvstore.backend import LocalBackend
from chashd.memcache.meta import MetaState
from chashd.memcache.server import MemcacheServerFactory
from chashd.memcache.text import RequestParser, serialize_command
from chashd.record import Record
from chashd.semantics import apply_write
from chashd.storage.memory import MemoryEngine
from chashd.versions import Version
from tests.unit.test_memcache_server import T0, LaterBackend, connect, make_factory


def talk(*requests: bytes, later: bool = False) -> list[bytes]:
    """Send each request on one connection (a backend answering later fires every answer at once); the reply
    to each, with cas values as ``c<cas>``."""
    clock = Clock()
    clock.advance(T0)
    backend: Any = LaterBackend(clock) if later else None
    factory, _ = make_factory(backend)
    protocol, transport = connect(factory)
    replies = []
    fired = 0
    for request in requests:
        transport.clear()
        protocol.dataReceived(request)
        while later and len(backend.waiting) > fired:  # each answer may ask for the next step
            backend.fire(fired)
            fired += 1
        replies.append(re.sub(rb" c[1-9]\d*", b" c<cas>", transport.value()))
    return replies


@pytest.fixture(params=["at once", "later"])
def later(request: pytest.FixtureRequest) -> bool:
    """Run a test over the kvstore's backend, then over one whose answers come later."""
    return bool(request.param == "later")


class MetaGetTests:
    """mg and its flags."""

    def test_miss_and_hit(self, later: bool) -> None:
        """A miss is EN (none with q, the O and k flags echoed); a hit answers the asked flags in order."""
        assert talk(
            b"mg foo v\r\n", b"mg foo v q\r\nmn\r\n", b"mg foo k Oab\r\n", b"ms foo 3 F7 T100\r\nbar\r\n",
            b"mg foo v f t c k s Oabc\r\n", b"mg foo\r\n", b"mg foo q\r\n", b"mg foo s v\r\n", later=later,
        ) == [
            b"EN\r\n", b"MN\r\n", b"EN kfoo Oab\r\n", b"HD\r\n", b"VA 3 f7 t100 c<cas> kfoo s3 Oabc\r\nbar\r\n",
            b"HD\r\n", b"HD\r\n", b"VA 3 s3\r\nbar\r\n",
        ]  # fmt: skip

    def test_touch_vivify_recache(self, later: bool) -> None:
        """T touches (t before it shows the old TTL); N creates an empty item and wins (W), later readers see Z;
        R wins when less TTL is left than asked."""
        assert talk(
            b"mg v N30 v c t\r\n", b"mg v N30 v t\r\n", b"ms r 2 T10\r\nhi\r\n", b"mg r t T100 R30\r\n",
            b"mg r t\r\n", b"ms r 2 T10\r\nhi\r\n", b"mg r R30 v t\r\n", b"mg r R30 v t\r\n", b"mg r v\r\n",
            later=later,
        ) == [
            b"VA 0 c<cas> t30 W\r\n\r\n", b"VA 0 t30 Z\r\n\r\n", b"HD\r\n", b"HD t10\r\n", b"HD t100\r\n",
            b"HD\r\n", b"VA 2 t10 W\r\nhi\r\n", b"VA 2 t10 Z\r\nhi\r\n", b"VA 2 Z\r\nhi\r\n",
        ]  # fmt: skip

    def test_errors(self) -> None:
        """memcached's words for bad flags; the unsupported flags say so."""
        assert talk(
            b"mg\r\n", b"mg foo zz\r\n", b"mg foo v v\r\n", b"mg foo Tx\r\n", b"mg foo v O" + b"o" * 40 + b"\r\n",
            b"mg foo h\r\n", b"mg foo b\r\n", b"mg " + b"k" * 251 + b" v\r\n", b"mg k " + b"s " * 20 + b"\r\n",
        ) == [
            b"ERROR\r\n", b"CLIENT_ERROR invalid flag\r\n", b"CLIENT_ERROR duplicate flag\r\n",
            b"CLIENT_ERROR bad token in command line format\r\n", b"CLIENT_ERROR opaque token too long\r\n",
            b"CLIENT_ERROR flags h and l (hit before, last access) are not supported\r\n",
            b"CLIENT_ERROR base64 keys (flag b) are not supported\r\n", b"CLIENT_ERROR bad command line format\r\n",
            b"CLIENT_ERROR options flags are too long\r\n",
        ]  # fmt: skip


class MetaSetTests:
    """ms and its modes and flags."""

    def test_modes(self, later: bool) -> None:
        """E add, A append, P prepend, R replace, S set; an invalid mode is refused and its data skipped."""
        assert talk(
            b"ms k 2 MA\r\nhi\r\n", b"ms k 2 ME\r\nhi\r\n", b"ms k 2 ME\r\nyo\r\n", b"ms k 2 MA\r\n!!\r\n",
            b"ms k 2 MP\r\n<<\r\n", b"mg k v\r\n", b"ms j 1 MR\r\nr\r\n", b"ms k 1 MX\r\nx\r\nmn\r\n",
            b"ms k 1 MS F5 T100 c k Oop\r\nz\r\n", b"mg k v f t\r\n", later=later,
        ) == [
            b"NS\r\n", b"HD\r\n", b"NS\r\n", b"HD\r\n", b"HD\r\n", b"VA 6\r\n<<hi!!\r\n", b"NS\r\n",
            b"CLIENT_ERROR invalid mode for ms M token\r\nMN\r\n", b"HD c<cas> kk Oop\r\n", b"VA 1 f5 t100\r\nz\r\n",
        ]  # fmt: skip

    def test_cas_noreply_and_errors(self, later: bool) -> None:
        """C compares (EX, NF; append too); q hides HD only; bad lines are memcached's errors, the data skipped."""
        assert talk(
            b"ms k 1 C1\r\nw\r\n", b"ms k 1\r\nx\r\n", b"ms k 1 C1\r\nw\r\n", b"ms k 1 MA C1\r\nw\r\n",
            b"ms k 1 q\r\nq\r\nms k 1 ME q\r\nq\r\nmn\r\n", b"ms k abc\r\nx\r\n", b"ms k\r\n",
            b"ms k 1 Fabc\r\nx\r\nmn\r\n", b"ms k 1 T\r\nx\r\nmn\r\n", b"ms k 3000\r\n" + b"x" * 3000 + b"\r\nmg k\r\n",
            later=later,
        ) == [
            b"NF\r\n", b"HD\r\n", b"EX\r\n", b"EX\r\n", b"NS\r\nMN\r\n",
            b"CLIENT_ERROR bad command line format\r\nERROR\r\n",
            b"CLIENT_ERROR bad command line format\r\n", b"CLIENT_ERROR bad command line format\r\nMN\r\n",
            b"CLIENT_ERROR bad token in command line format\r\nMN\r\n",
            b"SERVER_ERROR object too large for cache\r\nEN\r\n",
        ]  # fmt: skip

    def test_cas_from_mg_and_invalidate(self) -> None:
        """The cas mg gives stores with C; an older cas with I stores anyway, keeping the TTL, marking stale."""
        factory, _ = make_factory()
        protocol, transport = connect(factory)
        protocol.dataReceived(b"ms k 1 T100\r\nx\r\nmg k c\r\n")
        cas = int(transport.value().split(b" c")[1].split(b"\r\n")[0])
        transport.clear()
        protocol.dataReceived(
            b"ms k 1 C%d T90\r\ny\r\nms k 1 C%d\r\nz\r\nms k 1 C%d I\r\ns\r\nmg k v t\r\n" % (cas, cas, cas)
        )
        assert transport.value() == b"HD\r\nEX\r\nHD\r\nVA 1 t90 X W\r\ns\r\n"  # the TTL kept


class MetaDeleteArithTests:
    """md, ma, mn, me."""

    def test_delete(self, later: bool) -> None:
        """md answers HD, NF, EX (a compared cas); q hides HD; I marks stale (X, then W to one reader)."""
        assert talk(
            b"md k\r\n", b"md k q\r\nmn\r\n", b"ms k 1\r\nx\r\n", b"md k k Oz\r\n", b"ms k 1\r\nx\r\n",
            b"md k C1\r\n", b"md k I T30\r\n", b"mg k v t\r\n", b"mg k v t\r\n", b"md k q\r\nmn\r\n",
            b"md k x\r\n", later=later,
        ) == [
            b"NF\r\n", b"NF\r\nMN\r\n", b"HD\r\n", b"HD kk Oz\r\n", b"HD\r\n", b"EX\r\n", b"HD\r\n",
            b"VA 1 t30 X W\r\nx\r\n", b"VA 1 t30 Z X\r\nx\r\n", b"MN\r\n",
            b"CLIENT_ERROR invalid or duplicate flag\r\n",
        ]  # fmt: skip

    def test_arithmetic(self, later: bool) -> None:
        """ma increments (D, modes), creates on a miss with N and J, sets a TTL with T, compares a cas with C."""
        assert talk(
            b"ma n\r\n", b"ma n q\r\nmn\r\n", b"ma n N0 J10 v\r\n", b"ma n v\r\n", b"ma n MD D3 v t\r\n",
            b"ma n M- D100 v\r\n", b"ma n M+ D5\r\n", b"ma n Mx\r\n", b"ma n D-1\r\n", b"ms s 3\r\nabc\r\n",
            b"ma s\r\n", b"ma n T100 v t\r\n", b"ma n C1 v\r\n", b"ma n v k Oq\r\n", b"ma n q\r\nmn\r\n",
            later=later,
        ) == [
            b"NF\r\n", b"NF\r\nMN\r\n", b"VA 2\r\n10\r\n", b"VA 2\r\n11\r\n", b"VA 1 t-1\r\n8\r\n", b"VA 1\r\n0\r\n",
            b"HD\r\n", b"CLIENT_ERROR invalid mode for ma M token\r\n", b"CLIENT_ERROR invalid or duplicate flag\r\n",
            b"HD\r\n", b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n", b"VA 1 t100\r\n6\r\n",
            b"EX\r\n", b"VA 1 kn Oq\r\n7\r\n", b"MN\r\n",
        ]  # fmt: skip

    def test_noop_and_debug(self, later: bool) -> None:
        """mn answers MN; me answers EN on a miss, an ME line of the item's figures on a hit."""
        replies = talk(b"mn\r\nmn extra\r\n", b"me k\r\n", b"ms k 1 T100\r\nx\r\n", b"me k\r\n", later=later)
        assert replies[:3] == [b"MN\r\nMN\r\n", b"EN\r\n", b"HD\r\n"]
        assert re.fullmatch(rb"ME k exp=-100 la=0 cas=\d+ fetch=no cls=1 size=2\r\n", replies[3])


class MetaStateTests:
    """The meta bits hold for one cas of an item."""

    def test_bits_follow_the_cas(self) -> None:
        """An entry answers for its cas only; forgetting or a size cap drops entries, oldest first."""
        state = MetaState(size=2)
        state.set(b"a", 5, True, False)
        assert state.bits(b"a", 5) == (True, False) and state.bits(b"a", 6) == (False, False)
        state.set(b"b", 1, False, True)
        state.set(b"c", 1, True, True)
        assert state.bits(b"a", 5) == (False, False) and state.bits(b"c", 1) == (True, True)
        state.forget(b"c")
        assert state.bits(b"c", 1) == (False, False)


class MetaSemanticsTests:
    """What the meta commands add to the classic commands' semantics, and to the versioned extension."""

    def test_compared_cas_and_vivify(self) -> None:
        """A delete, an append and an incr with a cas unique answer EXISTS unless it matches; an incr with vivify
        creates a missing item holding the initial number, with its TTL; one with exptime sets the TTL."""
        v1, v2 = Version(1 << 16, "w"), Version(2 << 16, "w")
        record = Record(b"5", 0, 0, v1)
        assert apply_write(record, Delete(b"k", cas_unique=9), v2, T0, 100) == (None, Status.EXISTS)
        assert apply_write(record, Delete(b"k", cas_unique=v1.cas), v2, T0, 100)[1] is Status.DELETED
        assert apply_write(record, Store("append", b"k", 0, 0, b"x", 9), v2, T0, 100) == (None, Status.EXISTS)
        assert apply_write(record, Arith(b"k", 1, cas_unique=9), v2, T0, 100) == (None, Status.EXISTS)
        created, result = apply_write(None, Arith(b"k", 1, vivify=100, initial=42), v2, T0, 100)
        assert result == Number(42) and created == Record(b"42", 0, int(T0) + 100, v2)
        touched, result = apply_write(record, Arith(b"k", 2, exptime=50), v2, T0, 100)
        assert result == Number(7) and touched is not None and touched.expires_at == int(T0) + 50

    def test_xapply_carries_the_extension(self) -> None:
        """An xapply of a write a meta command made parses back into the same command, extension included."""
        parser = RequestParser()
        for write in (
            Delete(b"k", cas_unique=77),
            Arith(b"k", 3, False, cas_unique=5, exptime=-1, vivify=30, initial=9),
            Store("append", b"k", 0, 0, b"xy", 12),
            Delete(b"~k"),
        ):
            command = XApply(Version(7 << 16, "gw"), write)
            parser.feed(serialize_command(command))
            assert parser.next() == command


class MetaCommandTests:
    """The parsed command."""

    def test_has(self) -> None:
        """has() looks at the first character of each flag token."""
        command = MetaCommand("mg", b"k", (b"v", b"Oabc"))
        assert command.has("v") and command.has("O") and not command.has("k")


def test_factory_keeps_one_state() -> None:
    """Every connection of a listener shares the meta bits (a win seen by one is a Z for another)."""
    clock = Clock()
    factory = MemcacheServerFactory(LocalBackend(MemoryEngine(), "kv", clock, 100), clock)
    first, one = connect(factory)
    second, two = connect(factory)
    first.dataReceived(b"mg k N30 v\r\n")
    second.dataReceived(b"mg k v\r\n")
    assert one.value() == b"VA 0 W\r\n\r\n" and two.value() == b"VA 0 Z\r\n\r\n"


def answer_all(backend: LaterBackend, check: Callable[[], object] = lambda: None) -> None:
    """Fire every answer the backend waits to give, those the answers lead to included (``check`` first)."""
    fired = 0
    while fired < len(backend.waiting):
        check()
        backend.fire(fired)
        fired += 1


def test_pipelined_meta_commands_run_one_after_the_other() -> None:
    """Over a backend that answers later, a meta command starts only once the commands before it are answered,
    and the commands after it wait for its reply: a pipeline reads what it wrote, as on memcached."""
    clock = Clock()
    clock.advance(T0)
    backend = LaterBackend(clock)
    factory, _ = make_factory(backend)
    protocol, transport = connect(factory)
    protocol.dataReceived(b"set k 0 0 1\r\nx\r\nmg k v\r\nmg n N30 v\r\nmg n v\r\nget k\r\nmn\r\n")
    assert len(backend.waiting) == 1  # the set; the meta command waits for its answer
    answer_all(backend)
    assert transport.value() == b"STORED\r\nVA 1\r\nx\r\nVA 0 W\r\n\r\nVA 0 Z\r\n\r\nVALUE k 0 1\r\nx\r\nEND\r\nMN\r\n"


def test_half_close_waits_for_a_meta_command() -> None:
    """A client that half-closes behind pipelined meta commands gets every reply before the close."""
    clock = Clock()
    clock.advance(T0)
    backend = LaterBackend(clock)
    factory, _ = make_factory(backend)
    protocol, transport = connect(factory)
    protocol.dataReceived(b"ms k 1\r\nx\r\nmg k v\r\nmn\r\n")
    protocol.readConnectionLost()

    def open_still() -> None:
        assert not transport.disconnecting

    answer_all(backend, open_still)
    assert transport.value() == b"HD\r\nVA 1\r\nx\r\nMN\r\n" and transport.disconnecting
