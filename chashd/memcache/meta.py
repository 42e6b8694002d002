"""memcached 1.6's meta commands, run as the classic commands both backends already route and store.

Wire grammar (``RequestParser`` in ``chashd.memcache.text`` parses it into ``MetaCommand``; replies after
``->``). Flags are tokens whose first character names them; a flag that returns something answers in
the order the request gave it.

    mg <key> <flag>*                          -> VA <size> <flag>*\\r\\n<data>\\r\\n | HD <flag>* | EN
        v value, f client flags, t TTL left (-1: none), c cas, k key, s size, O<opaque> echoed, q no EN on a
        miss, u (accepted, no effect), T<ttl> touch, N<ttl> create an empty item on a miss, R<ttl> win the
        recache when less TTL is left; W (won), Z (another client won), X (stale) come back on their own
    ms <key> <datalen> <flag>*\\r\\n<data>\\r\\n -> HD | NS | EX | NF, then k, c<cas>, O<opaque> as asked
        M<mode> E add, A append, P prepend, R replace, S set (default); C<cas> compare; F<flags>; T<ttl>;
        I with C: a cas older than the item's still stores, marking the item stale; q: no HD
    md <key> <flag>*                          -> HD | NF | EX, then k, O
        C<cas> compare; I mark stale instead of deleting (a new cas; T<ttl> sets its TTL); q: no HD
    ma <key> <flag>*                          -> HD | VA <size> <flag>*\\r\\n<number>\\r\\n | NF | NS | EX
        M<mode> I/+ incr (default), D/- decr; D<delta> (1); N<ttl> create with J<initial> (0) on a miss;
        T<ttl> on success; C<cas>; v the number, t, c, k, O; q: no HD
    mn                                        -> MN
    me <key>                                  -> ME <key> exp=<ttl or -1> la=0 cas=<cas> fetch=no cls=1
                                                 size=<bytes> | EN

Each meta command becomes a few of the classic commands of ``chashd.commands`` (a get with cas, an add, a
store, a delete or an incr carrying a compared cas, a gat), so that a gateway routes them exactly as it
routes ``get``, ``set``, ``delete`` and ``incr``: N/W/R, versions, read repair, writes applied by the
key's primary. ``meta_steps`` is a generator: it yields each command, is sent the result the backend gave,
and returns the reply bytes; the server drives it (synchronously on a kvstore, across Deferreds on a
gateway). Errors the backend raises end the command with their usual ``CLIENT_ERROR``/``SERVER_ERROR``.

Where memcached keeps per-item bits (a recache token sent, stale), this keeps ``MetaState``: a bounded
table of key -> (cas, token sent, stale), valid while the item keeps that cas. It belongs to the server
that answers the meta commands: a kvstore's for its own port, each gateway's for its own clients (with
several gateways, two clients of different gateways can both win a recache). A write that does not come
through meta commands gives the item a new cas and so clears its bits, as a new item in memcached has none.
Not supported: flag ``b`` (base64 keys: a binary key could hold a space, which the versioned extension
cannot carry), ``h`` and ``l`` (hit-before and last-access times, which no engine keeps); they answer
``CLIENT_ERROR`` saying so.

Pure: no Twisted; time comes in as ``now``.
"""

from __future__ import annotations

from collections.abc import Generator

from chashd.commands import Arith, Command, Delete, Get, MetaCommand, Number, Result, Status, Store, StoreMode, Values
from chashd.record import RELATIVE_EXPIRY_LIMIT, Record

__all__ = ["MAX_OPAQUE", "MetaState", "MetaSteps", "meta_steps"]

#: memcached's longest opaque (``O``) token, the O included.
MAX_OPAQUE = 32
#: Items whose meta bits ``MetaState`` keeps at most (the oldest entries go first).
STATE_SIZE = 65536

_STORE_MODES: dict[str, StoreMode] = {"": "set", "S": "set", "E": "add", "A": "append", "P": "prepend", "R": "replace"}
_CODES = {
    Status.STORED: b"HD",
    Status.DELETED: b"HD",
    Status.TOUCHED: b"HD",
    Status.NOT_STORED: b"NS",
    Status.EXISTS: b"EX",
    Status.NOT_FOUND: b"NF",
}
_OPAQUE_TOO_LONG = b"CLIENT_ERROR opaque token too long\r\n"

#: What ``meta_steps`` is: it yields commands, is sent their results, returns the reply.
MetaSteps = Generator[Command, Result, bytes]


class MetaState:
    """The meta bits of items, as memcached keeps them in the item: whether a recache token was sent
    (``W`` given, so others see ``Z``) and whether the item is stale (``X``). An entry holds for the item's
    cas; a new cas (any other write) makes it void. At most ``size`` entries, the oldest dropped first."""

    __slots__ = ("_entries", "_size")

    def __init__(self, size: int = STATE_SIZE) -> None:
        self._entries: dict[bytes, tuple[int, bool, bool]] = {}
        self._size = size

    def bits(self, key: bytes, cas: int) -> tuple[bool, bool]:
        """``(token sent, stale)`` for the item of ``key`` with ``cas``."""
        entry = self._entries.get(key)
        if entry is None or entry[0] != cas:
            return False, False
        return entry[1], entry[2]

    def set(self, key: bytes, cas: int, sent: bool, stale: bool) -> None:
        """Record the bits of the item of ``key`` with ``cas`` (none set: forget it)."""
        entries = self._entries
        entries.pop(key, None)
        if not sent and not stale:
            return
        if len(entries) >= self._size:
            del entries[next(iter(entries))]
        entries[key] = (cas, sent, stale)

    def forget(self, key: bytes) -> None:
        """The item of ``key`` was replaced: it has no bits."""
        self._entries.pop(key, None)


def _exptime_of(record: Record) -> int:
    """The memcached exptime that keeps ``record``'s expiry: 0 (never), else its absolute Unix time."""
    expires_at = record.expires_at
    return expires_at if expires_at == 0 or expires_at > RELATIVE_EXPIRY_LIMIT else 1


def _ttl(record: Record, now: float) -> bytes:
    return b"-1" if record.expires_at == 0 else b"%d" % max(record.expires_at - int(now), 0)


def _found(result: Result, key: bytes) -> Record | None:
    if type(result) is Values:
        for item_key, record in result.items:
            if item_key == key:
                return record
    return None


def _echoed(token: bytes, key: bytes) -> bytes | None:
    """What an O or k flag adds to a reply (b"" for another flag); None when an opaque is too long."""
    flag = token[:1]
    if flag == b"O":
        return None if len(token) > MAX_OPAQUE else b" " + token
    return b" k" + key if flag == b"k" else b""


def _echo(command: MetaCommand, key: bytes, cas: int | None = None) -> bytes | None:
    """The O, k (and c, when ``cas`` is given) flags of a reply, in request order; None when an opaque is
    too long."""
    parts = []
    for token in command.tokens:
        if token[:1] == b"c" and cas is not None:
            parts.append(b" c%d" % cas)
            continue
        part = _echoed(token, key)
        if part is None:
            return None
        parts.append(part)
    return b"".join(parts)


def meta_steps(command: MetaCommand, state: MetaState, now: float) -> MetaSteps:
    """The classic commands that run ``command``, one by one; returns the reply bytes (b"" for none)."""
    verb = command.verb
    if verb == "mg":
        return (yield from _mg(command, state, now))
    if verb == "ms":
        return (yield from _ms(command, state))
    if verb == "md":
        return (yield from _md(command, state))
    if verb == "ma":
        return (yield from _ma(command, state, now))
    if verb == "me":
        return (yield from _me(command, now))
    return b"MN\r\n"


def _read(key: bytes) -> Get:
    return Get((key,), True)


def _mg(command: MetaCommand, state: MetaState, now: float) -> MetaSteps:
    key = command.key
    record = _found((yield _read(key)), key)
    created = False
    if record is None and command.vivify is not None:
        stored = yield Store("add", key, 0, command.vivify, b"")
        created = stored is Status.STORED
        record = _found((yield _read(key)), key)
    if record is None:
        echo = _echo(command, key)
        if echo is None:
            return _OPAQUE_TOO_LONG
        return b"" if command.noreply else b"EN" + echo + b"\r\n"
    if created:
        state.forget(key)
    touched: Record | None = None
    if command.ttl is not None:
        touched = _found((yield Get((key,), True, command.ttl)), key)
    sent, stale = state.bits(key, record.version.cas)
    won = created
    current = record
    parts = [b"VA %d" % len(record.value) if command.has("v") else b"HD"]
    for token in command.tokens:
        flag = token[:1]
        if flag == b"T":
            if touched is not None:
                current = touched
        elif flag == b"R":
            recache = command.recache
            expires_at = current.expires_at
            if recache is not None and not sent and not created and expires_at != 0 and expires_at < now + recache:
                won = True
        elif flag == b"s":
            parts.append(b" s%d" % len(current.value))
        elif flag == b"t":
            parts.append(b" t" + _ttl(current, now))
        elif flag == b"c":
            parts.append(b" c%d" % current.version.cas)
        elif flag == b"f":
            parts.append(b" f%d" % current.flags)
        else:
            part = _echoed(token, key)
            if part is None:
                return _OPAQUE_TOO_LONG
            parts.append(part)
    if sent:
        parts.append(b" Z")
    if stale:
        parts.append(b" X")
        if not sent:
            won = True
    if won:
        parts.append(b" W")
    final = touched if touched is not None else record
    if won or sent or stale:
        state.set(key, final.version.cas, True if won else sent, stale)
    parts.append(b"\r\n")
    if command.has("v"):
        parts.append(record.value + b"\r\n")
    return b"".join(parts)


def _ms(command: MetaCommand, state: MetaState) -> MetaSteps:
    key = command.key
    mode = _STORE_MODES[command.mode]
    cas = command.cas
    if cas is not None and mode in ("set", "replace"):
        mode = "cas"
    elif mode == "add":
        cas = None
    store = Store(mode, key, command.client_flags, command.ttl or 0, command.value, cas)
    result = yield store
    stale_store = False
    if result is Status.EXISTS and command.invalidate and mode == "cas":
        # I: a cas lower than the item's still stores, keeping its TTL, and marks the item stale.
        current = _found((yield _read(key)), key)
        if current is not None and cas is not None and cas < current.version.cas:
            sent, _ = state.bits(key, current.version.cas)
            result = yield Store("set", key, command.client_flags, _exptime_of(current), command.value)
            stale_store = result is Status.STORED
    new_cas = 0
    if result is Status.STORED:
        state.forget(key)
        if command.has("c") or stale_store:
            stored = _found((yield _read(key)), key)
            new_cas = stored.version.cas if stored is not None else 0
            if stale_store:
                state.set(key, new_cas, sent, True)
    assert isinstance(result, Status)
    echo = _echo(command, key, new_cas)
    if echo is None:
        return _OPAQUE_TOO_LONG
    if result is Status.STORED and command.noreply:
        return b""
    return _CODES[result] + echo + b"\r\n"


def _md(command: MetaCommand, state: MetaState) -> MetaSteps:
    key = command.key
    echo = _echo(command, key)
    if echo is None:
        return _OPAQUE_TOO_LONG
    if not command.invalidate:
        result = yield Delete(key, cas_unique=command.cas)
        if result is Status.DELETED:
            state.forget(key)
            return b"" if command.noreply else b"HD" + echo + b"\r\n"
        assert isinstance(result, Status)
        return _CODES[result] + echo + b"\r\n"
    # I: keep the item, give it a new cas (and the T TTL), mark it stale; the next mg wins the recache.
    current = _found((yield _read(key)), key)
    if current is None:
        return b"NF" + echo + b"\r\n"
    if command.cas is not None and command.cas != current.version.cas:
        return b"EX" + echo + b"\r\n"
    ttl = command.ttl if command.ttl is not None else _exptime_of(current)
    touched = _found((yield Get((key,), True, ttl)), key)
    if touched is None:
        return b"NF" + echo + b"\r\n"
    state.set(key, touched.version.cas, False, True)
    return b"" if command.noreply else b"HD" + echo + b"\r\n"


def _ma(command: MetaCommand, state: MetaState, now: float) -> MetaSteps:
    key = command.key
    incr = command.mode in ("", "I", "+")
    tokens = [token[:1] for token in command.tokens]
    vivify = command.vivify
    if vivify is not None and command.ttl is not None and tokens.index(b"T") > tokens.index(b"N"):
        vivify = command.ttl  # memcached applies the T and N tokens in order to a created item
    result = yield Arith(
        key,
        command.delta,
        incr,
        cas_unique=command.cas,
        exptime=command.ttl,
        vivify=vivify,
        initial=command.initial,
    )
    if type(result) is not Number:
        echo = _echo(command, key)
        if echo is None:
            return _OPAQUE_TOO_LONG
        assert isinstance(result, Status)
        return _CODES[result] + echo + b"\r\n"
    state.forget(key)
    record: Record | None = None
    if command.has("c") or command.has("t"):
        record = _found((yield _read(key)), key)
    number = b"%d" % result.value
    parts = [b"VA %d" % len(number) if command.has("v") else b"HD"]
    for token in command.tokens:
        flag = token[:1]
        if flag == b"c":
            parts.append(b" c%d" % (record.version.cas if record is not None else 0))
        elif flag == b"t":
            parts.append(b" t" + (_ttl(record, now) if record is not None else b"-1"))
        else:
            part = _echoed(token, key)
            if part is None:
                return _OPAQUE_TOO_LONG
            parts.append(part)
    if command.noreply:
        return b""
    parts.append(b"\r\n")
    if command.has("v"):
        parts.append(number + b"\r\n")
    return b"".join(parts)


def _me(command: MetaCommand, now: float) -> MetaSteps:
    key = command.key
    record = _found((yield _read(key)), key)
    if record is None:
        return b"EN\r\n"
    expiry = b"-1" if record.expires_at == 0 else b"%d" % (int(now) - record.expires_at)
    size = len(key) + len(record.value)
    return b"ME %s exp=%s la=0 cas=%d fetch=no cls=1 size=%d\r\n" % (key, expiry, record.version.cas, size)
