# The line protocol this server speaks: memcached's text protocol, and the versioned extension chashd's
# daemons use between themselves. chashd/memcache/text.py parses and serializes it.
#
# Wire grammar (what a server reads; replies after ``->``). ``\r\n`` ends a line (a bare ``\n`` is
# accepted too); tokens are separated by one or more spaces (only spaces: a tab is part of a token).
# ``<key>`` is 1-250 bytes without space or NUL; like memcached we accept control characters in it. Numbers
# are read as memcached's C parsers read them (``safe_strtoul``, ``safe_strtol``, ``safe_strtoull``):
# leading blanks and a sign are allowed, ``<flags>`` keeps its low 32 bits, ``<exptime>``/``<bytes>`` their
# low 32 bits as a signed number. ``[noreply]`` is recognised as the last token of the line.
#
#     get|gets|bget <key>*                       -> (VALUE <key> <flags> <bytes>[ <cas>]\r\n<data>\r\n)* END
#     gat|gats <exptime> <key>*                  -> same as get/gets, touching each hit
#     set|add|replace|append|prepend <key> <flags> <exptime> <bytes> [noreply]\r\n<data>\r\n
#                                                -> STORED | NOT_STORED
#     cas <key> <flags> <exptime> <bytes> <cas unique> [noreply]\r\n<data>\r\n
#                                                -> STORED | EXISTS | NOT_FOUND
#     delete <key> [0] [noreply]                 -> DELETED | NOT_FOUND
#     incr|decr <key> <delta> [noreply]          -> <new value> | NOT_FOUND
#     touch <key> <exptime> [noreply]            -> TOUCHED | NOT_FOUND
#     flush_all [<delay>] [noreply]              -> OK
#     stats [settings|items|slabs|sizes|conns]   -> (STAT <name> <value>)* END
#     stats cachedump <class> <limit>            -> (ITEM <key> [<bytes> b; <expires_at> s])* END
#     stats reset                                -> RESET          (stats detail on|off|dump as memcached)
#     cache_memlimit <MiB> [noreply]             -> OK | MEMLIMIT_TOO_SMALL ... | MEMLIMIT_ADJUST_FAILED ...
#     shutdown [graceful]                        -> (with --enable-shutdown: closes, the daemon stops)
#                                                   | ERROR: shutdown not enabled
#     lru_crawler metadump all|hash|<ids>        -> (key=<URL-encoded key> exp=<expires_at or -1> la=<now>
#                                                   cas=<cas> fetch=no cls=1 size=<key + value bytes>\n)* END
#                                                   | BADCLASS invalid class id
#     lru_crawler crawl|sleep|tocrawl <arg>, lru_crawler enable|disable -> OK (no crawler: nothing changes)
#     mg <key> <flag>*                           -> VA <size> <flag>*\r\n<data>\r\n | HD <flag>* | EN
#     ms <key> <datalen> <flag>*\r\n<data>\r\n    -> HD | NS | EX | NF, <flag>*
#     md <key> <flag>*                           -> HD | NF | EX, <flag>*
#     ma <key> <flag>*                           -> HD | VA <size> <flag>*\r\n<number>\r\n | NF | NS | EX
#     mn                                         -> MN
#     me <key>                                   -> ME <key> exp=.. la=.. cas=.. fetch=.. cls=.. size=.. | EN
#                                                   (the meta commands of memcached 1.6: chashd/memcache/meta.py
#                                                   lists their flags and how they run)
#     version                                    -> VERSION 1.6.18-chashd-<chashd's version>
#     verbosity <level> [noreply]                -> OK
#     quit                                       -> (the server closes the connection)
#
# Faults answer as memcached 1.6 does: ``ERROR`` (unknown command, wrong number of tokens, the binary
# protocol, which we do not speak; a binary request is answered ``ERROR`` and the connection closed),
# ``CLIENT_ERROR bad command line format`` (a key over 250 bytes, a bad number; the meta commands' own
# words for their flags), ``CLIENT_ERROR bad data chunk`` (the ``<bytes>+2`` bytes after a storage command
# do not end in ``\r\n``; what follows them is read as the next command), ``SERVER_ERROR object too large
# for cache`` (``<bytes>`` over the value limit: the data block is skipped unread, and a ``set`` deletes the
# key's old value, as memcached does so that a failed set never leaves a stale value). A line over 2048
# bytes without its newline closes the connection silently (so does a line over 16 KiB, memcached's read
# buffer), except a ``get``/``gets`` (or ``xget``) line, which may grow to ``max_keys`` keys; past that the
# server answers ``SERVER_ERROR out of memory reading request`` and closes, as memcached does when it cannot
# grow its buffer. A line whose last token starts with ``HTTP/`` is an HTTP request: the connection closes
# silently.
# ``noreply`` silences every reply of its command, errors included, as in memcached.
#
# The versioned extension (between gateways, the handoff and kvstores; no memcached command starts with
# ``x``). ``<version>`` is ``str(Version)``: ``<clock>`` or ``<clock>-<writer>``; ``<expires_at>`` is a Unix
# time (0: never); ``<tombstone>`` is 0 or 1. The numbers here are plain decimal digits, bounded: ``<flags>``
# and ``<expires_at>`` 32 bits, ``<clock>`` 63 bits, ``<writer>`` an id (else ``CLIENT_ERROR bad command line
# format``). A kvstore also refuses a version further ahead of its clock than ``--max-clock-skew``.
#
#     xget <key>+                                -> (XVALUE <key> <flags> <expires_at> <version> <tombstone> <bytes>\r\n
#                                                    <data>\r\n)* END        every stored record, tombstones included
#     xver <key>                                 -> XVER <version> | END   only the version of the key's stored
#                                                   record (a tombstone's and an expired one's too), END when none is
#                                                   stored: a gateway's quorum read asks the replicas after the first
#                                                   this (a server of an earlier version answers ERROR: asked with xget)
#     xput <key> <flags> <expires_at> <version> <tombstone> <bytes> [noreply]\r\n<data>\r\n
#                                                -> STORED (kept) | EXISTS (an equal or newer version is stored)
#     xmove <the same as xput>                   -> the same: an xput sent by a rebalancing handoff (XPut.handoff)
#     xbulk <rows> <bytes>\r\n<page>\r\n          -> XBULKED <stored> <kept>   once the page's rows newer than the
#                                                   stored ones are committed, in one grouped write; <kept>: the
#                                                   rows not stored (an equal or newer version is). <page>: the
#                                                   rows, length-prefixed (layout in chashd/bulk.py); a page that
#                                                   does not decode, or whose newest version is too far ahead,
#                                                   is refused whole: CLIENT_ERROR bad bulk page: ... (the sender
#                                                   then sends its records as xmove); over 8 MiB plus one value:
#                                                   CLIENT_ERROR bulk page of <bytes> bytes too large
#     xbulk                                      -> XBULK <format>   (the page format read, 1). A server of an
#                                                   earlier version answers ERROR: the sender uses xmove there,
#                                                   and sends a page only on a connection that answered XBULK
#     xapply <version> <a write command line: set|add|replace|append|prepend|cas|delete|incr|decr|touch ...>
#            [\r\n<data>]\r\n
#                                                -> XAPPLIED <the reply line of that command>\r\n
#                                                   [XVALUE ... block of the record it wrote]END
#                                                   (or the CLIENT_ERROR/SERVER_ERROR line of the plain command,
#                                                   or SERVER_ERROR a newer version is stored than the version of
#                                                   this write: <the stored version>, when the stored record is as
#                                                   new as <version> or newer)
#     xauth <token>                              -> OK | CLIENT_ERROR authentication failed: ... (then the server
#                                                   closes the connection)
#     xmap <epoch>                               -> OK      (a gateway names the cluster map epoch it routes the
#                                                   commands that follow on this connection by: the kvstore keeps
#                                                   the newest epoch it knows, and answers an xapply from a
#                                                   connection of an older map SERVER_ERROR stale cluster map:
#                                                   epoch <sent> is older than epoch <known> known here, applying
#                                                   nothing; a kvstore of an earlier version answers ERROR)
#     xfence <epoch>                             -> OK      (the next xput on this connection copies the result
#                                                   of a read-modify-write run by the map of that epoch: a
#                                                   kvstore that knows a newer epoch answers that xput
#                                                   SERVER_ERROR stale cluster map: ..., storing nothing; a
#                                                   kvstore of an earlier version answers ERROR, and stores the
#                                                   xput as any other)
#     xlease <key> <holder> <deadline ms> <s|x>  -> as xget <key>, and the key is leased to that read-modify-
#                                                   write (chashd/leases.py), shared or exclusive, until the
#                                                   deadline plus 0.5 s; SERVER_ERROR key leased by another
#                                                   read-modify-write until <ms> while a conflicting lease
#                                                   lasts (nothing leased); a deadline more than 3 s ahead:
#                                                   CLIENT_ERROR; a kvstore of an earlier version answers ERROR
#     xdeadline <holder> <deadline ms> <s|x>     -> OK      (the next xapply or xput on this connection is a
#                                                   store of that read-modify-write: refused past the deadline,
#                                                   SERVER_ERROR read-modify-write past its deadline <ms>, or
#                                                   while a conflicting lease lasts, SERVER_ERROR key leased
#                                                   ...; a kvstore of an earlier version answers ERROR, and
#                                                   takes the store as any other)
#     xrelease <key> <holder> <deadline ms> [<floor ms>]
#                                                -> OK      (that read-modify-write is over: its lease on the key,
#                                                   of that round or an earlier one, ends at once, or once the
#                                                   clock passes <floor> plus 0.5 s if sooner; a kvstore of an
#                                                   earlier version answers ERROR)
#
# A kvstore given the cluster token runs only plain reads (get, gets, and the meta commands' reads: mg without
# T or N, me, mn) and stats (but stats reset), version, verbosity and quit on a connection that has not sent
# ``xauth <token>``; anything else (ms, md, ma, an mg that touches or creates included) is answered
# ``CLIENT_ERROR authentication required: send xauth <token> first``.
#
# ``xapply`` always replies (a ``noreply`` inside it is ignored) and writes with ``<version>``. It is refused
# (``StaleVersion``) rather than applied over a record it is not newer than: the gateway moves its clock past
# the stored version and sends it again, and a request a gateway gave up on (a paused primary) never undoes
# the writes that came after it.
#
# Anti-entropy (between kvstores, chashd/kvstore/antientropy.py), on the hash range ``[<first>, <last>]`` (32-bit
# ring hashes) of the ring whose placement id is ``<placement>`` (16 hex digits): a node whose data does not
# conform to that placement (another ring, or a handoff under way) answers ``SERVER_ERROR not synced to
# placement <placement>``.
#
#     xdigest <placement> <first> <last> <parts> [<sender node id>]
#                                                -> (DIGEST <records> <total>\r\n){parts} END
#                                                   the digest of each of <parts> (1-256) equal sub-ranges
#     xepoch <epoch>                             -> OK      (a handoff names the ring it pushes the records that
#                                                   follow for: a node that sees a newer ring than it knows
#                                                   stops dropping records until it knows that ring)
#     xlist <placement> <first> <last> <limit> [<after hash> <after key>]
#                                                -> (XKEY <hash> <key> <version>\r\n)* END
#                                                   up to <limit> (1-10000) records in (hash, key) order,
#                                                   after the position given

"""The line protocol's server: ``MemcacheServerFactory`` and ``MemcacheServerProtocol`` over an ``IKeyValue``.

Bytes go to the pure ``RequestParser`` of ``chashd.memcache.text``, which does memcached's framing (a line,
then a declared data block, or a skipped one) with memcached's limits; this is why the protocol is a plain
``Protocol`` rather than a ``LineReceiver``: memcached accepts a bare LF, reads a whole line past 2048 bytes
when it came in one read but closes on 2048 bytes without a newline (except a multi-key get), which
``MAX_LENGTH`` cannot say. Memory per connection stays bounded by the parser's limits (a line, a data block
of at most the value limit + 2 bytes) and by the cap on pending replies.

- Replies leave in request order. A backend result that is not a Deferred is written inline (all the
  replies to one read go out in one write); a Deferred goes into a queue of pending replies, each written
  when it and every one before it are done. When ``max_pending`` replies are pending the connection stops
  parsing, and reading too (``pauseProducing``) once the client sends more than was parsed (a client with one
  request in flight sends nothing more before its reply: its transport is never paused), and resumes when
  half of them have left. Likewise while the
  transport's write buffer is full (a client that does not read its replies): the protocol is the
  transport's streaming producer.
- Errors are mapped to the wire in one place (``text.error_reply``): a domain error becomes memcached's
  line; any other exception becomes ``SERVER_ERROR internal error`` and a logged failure. Nothing a
  client sends can stop the daemon or touch another connection.
- ``stats`` (and its groups), ``version``, ``verbosity``, ``quit``, ``cache_memlimit`` and ``shutdown`` are
  answered here; ``stats`` merges the backend's ``stats()`` and the role's ``IServerAdmin.stats_extra()``
  with this listener's counters (``curr_connections``, ``total_connections``, ...). The groups answer as
  memcached 1.6 does, with what a role has: ``settings`` (memcached's names where they apply), ``items`` and
  ``slabs`` (one pseudo slab class, 1, holding every item: no slabs here), ``sizes`` (disabled), ``conns``
  (this listener's connections), ``cachedump`` (the first items of the kvstore's ring order). ``version``
  says ``1.6.18-chashd-<version>``: clients read it as memcached's (libmemcached refuses a major version 0).
  ``shutdown`` stops the daemon only with ``--enable-shutdown`` (memcached's ``-A``).
- Memory per connection is bounded in bytes too: replies pending (a request in flight counts as the
  largest reply it may get: its keys times the value limit; a reply done and not written, its size) are
  capped at ``max_pending_bytes``; above it the connection stops parsing (and reading, as above), and
  resumes below half of it; what one read of the transport brings meanwhile (64 KiB) is kept unparsed.
  While the transport's write buffer is full, done replies stay in the queue (counted) instead of piling up
  in the transport: a client that pipelines gets of a large value and never reads holds about
  ``max_pending_bytes``, not ``max_pending`` values.
- Past ``max_connections``, the connection idle longest (nothing pending or half-received, nothing read
  for ``EVICT_IDLE`` seconds or more) is closed to make room for the new one (``idle_evictions``), so that
  idle connections cannot lock new clients out; when none is idle the new connection gets ``ERROR Too many
  open connections`` and is closed, as memcached does. A connection idle for ``idle_timeout`` seconds is
  closed (0: never); one that leaves a command half-sent (a line without its end, a data block short of its
  length) for ``client_timeout`` seconds is closed too (``slow_clients_closed``; 0: never).
- Meta commands (``mg``, ``ms``, ``md``, ``ma``, ``mn``, ``me``) run as the steps ``chashd.memcache.meta``
  plans: classic commands sent to the backend one after the other (each step's result, at once on a
  kvstore or later on a gateway, decides the next), so that a gateway routes them with the N/W/R and
  version rules of ``get``, ``set``, ``delete`` and ``incr``; their reply takes its place in the order.
- A connection's commands act in the order it sent them, as memcached runs them one after the other, also
  on a backend that answers later (a gateway) and so runs several at once: a command that writes a key a
  pending command of the connection reads or writes, or reads a key one writes (every key, after a
  ``flush_all``), waits, with what follows it, until every reply before it is in. So a pipelined
  ``delete k`` then ``get k`` misses, and an ``incr`` behind a ``set`` sees the value set; commands on
  other keys run at once.
- Half-close (``IHalfCloseableProtocol``): a client that shuts its write side after its requests still gets
  a reply to every one of them, in order (a gateway's included, when they come later), then the connection
  closes, as memcached does.
- With a ``token`` (a kvstore given the cluster token), a connection runs plain reads (``get``, ``gets``)
  and ``stats`` (but ``stats reset``), ``version``, ``verbosity``, ``quit`` until it proves the token with
  ``xauth <token>`` (compared in constant time): everything else, the versioned extension, ``flush_all``,
  memcached's writes, ``cache_memlimit``, ``shutdown``, ``stats reset`` and any command added later, is
  refused (``CLIENT_ERROR authentication required``, counted in ``line_commands_refused_total``). A meta
  command runs its steps through the same guard, so ``mg``, ``me`` and ``mn`` answer while ``ms``, ``md``,
  ``ma`` and an ``mg`` that touches (``T``) or creates (``N``) are refused. That is an allow-list: the
  connection's ``execute`` is a guard until the token is proved. A wrong token is answered ``CLIENT_ERROR
  authentication failed`` and closes the connection (``line_auth_failures_total``).

Four shortcuts, taken when the backend provides their interface (asked once, when the factory is built),
answer exactly as the general path (``execute``) would:

- ``IPlainGet``: a ``get`` of one plain key is answered with the backend's ``get_one``, without command and
  result objects; a read that is exactly one such line (a client with one request in flight) is answered
  before the parser's loop, in one write of its own.
- ``IForwardedGet`` (a gateway's router): a ``get`` of one plain key is offered to the backend's
  ``forward_get``, whose reply (the bytes of a kvstore's) comes to a sink holding its place in the queue of
  pending replies: no command, result or Deferred. A get the backend declines takes the general path.
- ``IForwardedSet`` (a gateway's router): a ``set``, once it may run (after the pending commands of its key
  it waits for) and on a connection that proved the token, is offered to the backend's ``forward_set``, whose
  result comes to a sink holding its place in the queue: no Deferred. A set the backend declines takes the
  general path.
- ``IGroupedPuts``: consecutive ``XPut`` commands of one read (a handoff pipelines hundreds) go to the
  backend's ``execute_puts`` in one call, so that the kvstore stores them in one transaction.

A bulk page (``xbulk``: up to a few hundred records applied in one write, a few ms) is the most a connection
runs in one turn of the reactor: after one, while more is buffered, the connection reads and parses nothing
until the reactor has polled once more, so that the requests of other connections (clients' reads) that came
during a page are served before the next one.
"""

from __future__ import annotations

import hmac
import os
from collections import deque
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any, cast
from urllib.parse import quote_from_bytes

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IHalfCloseableProtocol, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

import chashd
from chashd.commands import (
    NOREPLY_COMMANDS,
    Arith,
    Bulked,
    BulkFormat,
    BulkProbe,
    CacheMemlimit,
    Command,
    Delete,
    FlushAll,
    Get,
    LruCrawler,
    MetaCommand,
    Number,
    Quit,
    Result,
    Shutdown,
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
from chashd.errors import DomainError, Unauthenticated
from chashd.interfaces import IForwardedGet, IForwardedSet, IGroupedPuts, IKeyValue, IPlainGet, IReplySink, IServerAdmin
from chashd.memcache._transport import set_nodelay, writer
from chashd.memcache.meta import MetaState, MetaSteps, meta_steps
from chashd.memcache.text import (
    DEFAULT_MAX_KEYS,
    DEFAULT_MAX_LINE,
    DEFAULT_MAX_VALUE_SIZE,
    FailedRequest,
    RequestParser,
    error_reply,
    plain_get_reply,
    serialize_result,
    stats_reply,
    version_reply,
)
from chashd.metrics import LatencyHistogram, RequestMetrics

__all__ = ["SERVER_VERSION", "MemcacheServerFactory", "MemcacheServerProtocol"]

#: What ``version`` answers: the memcached release whose replies this protocol matches (tested against it),
#: then chashd's own version. Clients parse it as memcached's ``major.minor.micro``.
SERVER_VERSION = f"1.6.18-chashd-{chashd.__version__}"

_OK = b"OK\r\n"
_TOO_MANY_CONNECTIONS = b"ERROR Too many open connections\r\n"
_STATS_USAGE = b"CLIENT_ERROR usage: stats detail on|off|dump\r\n"
_LOCAL = frozenset(
    {
        FailedRequest, StatsCommand, VersionCommand, Verbosity, Quit, CacheMemlimit, Shutdown, XAuth, MetaCommand,
        LruCrawler, XMap,
    }
)  # fmt: skip
#: Results answered at once: ``_handle`` tells them from a Deferred by their type first (``isinstance`` of a
#: Deferred goes through ``ABCMeta.__instancecheck__``, about 1 us: a kvstore's answers to xver paid it).
_RESULTS = frozenset({Status, Values, Number, StatsResult, XApplied, Bulked, BulkFormat, VersionOf})
_FLUSH_AT = 65536  # bytes of replies gathered before they are written (the transport's buffer size)
_PUT_GROUP = 512  # most XPuts run in one IGroupedPuts call
_CLOSE = object()  # a queue entry: close the connection once everything before it is written
#: What a request that is not a read is charged while in flight (its reply is a line).
_SMALL_REPLY = 64
#: A read's reply is charged this much per key on top of the value limit (its VALUE line).
_VALUE_LINE = 320
#: Seconds a connection must have been idle before it may be closed to make room for a new one.
EVICT_IDLE = 1.0
_LocalCommand = (
    StatsCommand
    | VersionCommand
    | Verbosity
    | Quit
    | CacheMemlimit
    | Shutdown
    | XAuth
    | MetaCommand
    | LruCrawler
    | XMap
)
#: The local commands a connection may send before it proved the token (``stats`` but ``stats reset``). A meta
#: command is one of them: its steps go through the connection's ``execute``, which runs plain reads only.
_OPEN_LOCAL = frozenset({FailedRequest, StatsCommand, VersionCommand, Verbosity, Quit, XAuth, MetaCommand})
#: memcached's highest slab class id + 1: ``stats cachedump`` refuses ids from here on.
_SLAB_CLASSES = 64
#: Records ``lru_crawler metadump`` reads a page: one engine scan, one write, then the reactor's other work.
_METADUMP_PAGE = 500
#: Most items ``stats cachedump`` lists (memcached caps its answer at 2 MB).
_DUMP_LIMIT = 1000


def _address(address: Any) -> str:
    """``tcp:<host>:<port>`` (or ``unix:<path>``), as ``stats conns`` names an address ("" for none)."""
    if address is None:
        return ""
    port = getattr(address, "port", None)
    if port is None:
        return f"unix:{getattr(address, 'name', address)}"
    return f"tcp:{address.host}:{port}"


#: The command family of each command, for the latency histograms (chashd.metrics.FAMILIES).
_FAMILIES: dict[type, str] = {
    Get: "get", Store: "store", Delete: "delete", Arith: "arith", Touch: "touch",
    XGet: "internal", XVer: "internal", XPut: "internal", XApply: "internal", XAuth: "internal",
    XBulk: "internal", BulkProbe: "internal", XDigest: "internal", XList: "internal", XEpoch: "internal",
    XMap: "internal", XFence: "internal", XLease: "internal", XDeadline: "internal",
    XRelease: "internal",
    FlushAll: "other", StatsCommand: "other", VersionCommand: "other", Verbosity: "other", Quit: "other",
    CacheMemlimit: "other", Shutdown: "other", MetaCommand: "other", LruCrawler: "other",
}  # fmt: skip


class MemcacheServerFactory(Factory):
    """Builds server connections over ``backend``; holds the listener's limits, counters and connections.

    ``plain_get``, ``grouped_puts`` and ``forwarded_get`` are the backend as ``IPlainGet``, ``IGroupedPuts``
    and ``IForwardedGet`` when it provides them, else None: asked once, here, so that no request pays for
    the question. ``admin`` answers the admin commands (default: the backend, when it provides
    ``IServerAdmin``); ``shutdown``, when given, is what the ``shutdown`` command calls
    (``--enable-shutdown``), else the command is refused. With
    ``requests``, every command is timed into its family's histogram (surface ``line``) from the moment
    it is parsed to the moment its reply is queued, and every error reply is counted; ``latency`` maps
    each command class to its histogram. ``token``: the
    cluster token connections must prove before anything but plain reads (None: nothing to prove).
    """

    _log = Logger()

    def __init__(
        self,
        backend: IKeyValue,
        clock: IReactorTime,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
        max_connections: int = 1024,
        idle_timeout: float = 600.0,
        max_line: int = DEFAULT_MAX_LINE,
        max_keys: int = DEFAULT_MAX_KEYS,
        max_pending: int = 256,
        version: str = SERVER_VERSION,
        admin: IServerAdmin | None = None,
        shutdown: Callable[[], object] | None = None,
        requests: RequestMetrics | None = None,
        token: str | bytes | None = None,
        max_pending_bytes: int = 1024 * 1024,
        client_timeout: float = 30.0,
    ) -> None:
        self.backend = backend
        self.token = token.encode() if isinstance(token, str) else token
        self.commands_refused = 0
        self.auth_failures = 0
        if admin is None and IServerAdmin.providedBy(backend):
            admin = cast(IServerAdmin, backend)
        self.admin = admin
        self.shutdown = shutdown
        #: The meta bits of items (recache token sent, stale) for the meta commands of every connection.
        self.meta_state = MetaState()
        #: The open connections by id (``stats conns``); ids count up from 1 per listener.
        self.connections: dict[int, MemcacheServerProtocol] = {}
        self._next_id = 0
        self.requests = requests
        self.latency: dict[type, LatencyHistogram] | None = None
        if requests is not None:
            self.latency = {kind: requests.histogram("line", family) for kind, family in _FAMILIES.items()}
        self.plain_get = cast(IPlainGet, backend) if IPlainGet.providedBy(backend) else None
        self.grouped_puts = cast(IGroupedPuts, backend) if IGroupedPuts.providedBy(backend) else None
        self.forwarded_get = cast(IForwardedGet, backend) if IForwardedGet.providedBy(backend) else None
        self.forwarded_set = cast(IForwardedSet, backend) if IForwardedSet.providedBy(backend) else None
        self.clock = clock
        self.max_value_size = max_value_size
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.max_line = max_line
        self.max_keys = max_keys
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.client_timeout = client_timeout
        self.version = version
        self.started = clock.seconds()
        self.curr_connections = 0
        self.total_connections = 0
        self.rejected_connections = 0
        self.idle_closed = 0
        self.idle_evicted = 0
        self.slow_closed = 0
        self.paused_for_memory = 0

    def buildProtocol(self, addr: IAddress | None) -> MemcacheServerProtocol:
        """A new server connection."""
        return MemcacheServerProtocol(self)

    def auth_stats(self) -> dict[str, int]:
        """Commands refused for want of the token, and wrong tokens (for the backend's ``stats``)."""
        return {"line_commands_refused_total": self.commands_refused, "line_auth_failures_total": self.auth_failures}

    def evict_idle(self) -> bool:
        """Close the connection idle longest, if one was idle ``EVICT_IDLE`` seconds; True if one was."""
        now = self.clock.seconds()
        idle = [p for p in self.connections.values() if p.idle and now - p.last_seen >= EVICT_IDLE]
        if not idle:
            return False
        victim = min(idle, key=lambda p: p.last_seen)
        self.idle_evicted += 1
        self._log.info("closing a connection idle for {idle:.0f}s to make room", idle=now - victim.last_seen)
        victim.evict()
        return True

    def register(self, protocol: MemcacheServerProtocol) -> int:
        """Count a new connection in ``connections``; its id."""
        self._next_id += 1
        self.connections[self._next_id] = protocol
        return self._next_id

    def stats(self) -> list[tuple[str, str]]:
        """The ``stats`` lines: this listener's counters, then the backend's and the role's extra ones."""
        now = self.clock.seconds()
        items = [
            ("pid", str(os.getpid())),
            ("uptime", str(int(now - self.started))),
            ("time", str(int(now))),
            ("version", self.version),
            ("curr_connections", str(self.curr_connections)),
            ("total_connections", str(self.total_connections)),
            ("rejected_connections", str(self.rejected_connections)),
            ("idle_kicks", str(self.idle_closed)),
            ("idle_evictions", str(self.idle_evicted)),
            ("slow_clients_closed", str(self.slow_closed)),
            ("paused_for_memory", str(self.paused_for_memory)),
            ("max_connections", str(self.max_connections)),
        ]
        seen = {name for name, _ in items}
        extra = self.admin.stats_extra() if self.admin is not None else {}
        for name, value in [*self.backend.stats().items(), *extra.items()]:
            if name not in seen:
                seen.add(name)
                items.append((name, str(value)))
        return items

    def settings(self) -> list[tuple[str, str]]:
        """The ``stats settings`` lines: memcached's names where they apply, then the role's."""
        items = [
            ("maxconns", str(self.max_connections)),
            ("verbosity", "0"),
            ("shutdown_command", "yes" if self.shutdown is not None else "no"),
            ("num_threads", "1"),
            ("cas_enabled", "yes"),
            ("binding_protocol", "ascii"),
            ("item_size_max", str(self.max_value_size)),
            ("idle_timeout", str(int(self.idle_timeout))),
            ("dump_enabled", "yes"),
            ("max_line", str(self.max_line)),
            ("max_keys_per_get", str(self.max_keys)),
            ("max_pending_replies", str(self.max_pending)),
            ("max_pending_bytes", str(self.max_pending_bytes)),
            ("client_timeout", f"{self.client_timeout:g}"),
            ("backend", self.backend.name),
        ]
        if self.admin is not None:
            items += [(name, str(value)) for name, value in self.admin.settings().items()]
        return items

    def reset(self) -> None:
        """``stats reset``: this listener's counters (not ``curr_connections``) and the role's."""
        self.total_connections = 0
        self.rejected_connections = 0
        self.idle_closed = 0
        self.idle_evicted = 0
        self.slow_closed = 0
        self.paused_for_memory = 0
        if self.admin is not None:
            self.admin.reset_stats()

    def items(self) -> list[tuple[str, str]]:
        """``stats items``: one pseudo slab class holding every item, as memcached names its figures."""
        stats = self.backend.stats()
        count = stats.get("curr_items", 0)
        if not count:
            return []
        figures = {
            "number": count,
            "age": 0,
            "mem_requested": stats.get("bytes", 0),
            "evicted": stats.get("evictions", 0),
            "evicted_nonzero": 0,
            "evicted_time": 0,
            "outofmemory": stats.get("outofmemory", 0),
            "reclaimed": stats.get("reclaimed", 0),
            "expired_unfetched": 0,
            "evicted_unfetched": 0,
        }
        return [(f"items:1:{name}", str(value)) for name, value in figures.items()]

    def slabs(self) -> list[tuple[str, str]]:
        """``stats slabs``: the pseudo slab class 1 and memcached's two totals."""
        stats = self.backend.stats()
        count = stats.get("curr_items", 0)
        used = stats.get("bytes", 0)
        lines = []
        if count:
            lines = [("1:used_chunks", str(count)), ("1:mem_requested", str(used))]
        return [*lines, ("active_slabs", "1" if count else "0"), ("total_malloced", str(used))]

    def conns(self, asking: MemcacheServerProtocol) -> list[tuple[str, str]]:
        """``stats conns``: each open connection's address, state and idle seconds."""
        now = self.clock.seconds()
        lines = []
        for number, protocol in sorted(self.connections.items()):
            prefix = f"{number}:"
            lines += [
                (prefix + "addr", protocol.peer),
                (prefix + "listen_addr", protocol.host),
                (prefix + "state", "conn_parse_cmd" if protocol is asking else "conn_waiting"),
                (prefix + "secs_since_last_cmd", str(int(now - protocol.last_seen))),
            ]
        return lines


@implementer(IReplySink)
class _Forwarded:
    """Where the reply to a forwarded get goes (``IForwardedGet``): its cell in the queue of pending replies;
    timed into the get histogram from when it was asked."""

    __slots__ = ("called", "cell", "protocol", "start")

    def __init__(self, protocol: MemcacheServerProtocol, cell: list[Any]) -> None:
        self.protocol = protocol
        self.cell = cell
        self.called = False
        self.start = perf_counter() if protocol._get_latency is not None else 0.0

    def callback(self, reply: bytes) -> None:
        self.called = True
        self.cell[0] = reply
        self.protocol._settle(self.cell)
        self._done()

    def errback(self, error: Any) -> None:
        self.called = True
        self.cell[0] = self.protocol._failed_reply(error, "a get")
        self.protocol._settle(self.cell)
        self._done()

    def _done(self) -> None:
        protocol = self.protocol
        histogram = protocol._get_latency
        if histogram is not None:
            histogram.observe(perf_counter() - self.start)
        protocol._drain()


@implementer(IReplySink)
class _SetReply:
    """Where the result of a forwarded ``set`` goes (``IForwardedSet``): its cell in the queue of pending
    replies, as ``_pending``'s callbacks would put it there (the key counted as written until then); timed
    into the set histogram from when it was handled."""

    __slots__ = ("called", "cell", "command", "protocol", "start")

    def __init__(self, protocol: MemcacheServerProtocol, command: Store, cell: list[Any], start: float) -> None:
        self.protocol = protocol
        self.command = command
        self.cell = cell
        self.start = start
        self.called = False

    def callback(self, result: Status) -> None:
        self.called = True
        command = self.command
        self.cell[0] = b"" if command.noreply else serialize_result(command, result)
        self._done()

    def errback(self, error: Any) -> None:
        self.called = True
        reply = self.protocol._failed_reply(error, "Store")
        self.cell[0] = b"" if self.command.noreply else reply
        self._done()

    def _done(self) -> None:
        protocol = self.protocol
        protocol._track(self.command, -1)
        protocol._settle(self.cell)
        latency = protocol._latency
        if latency is not None:
            latency[Store].observe(perf_counter() - self.start)
        protocol._drain()


@implementer(IPushProducer, IHalfCloseableProtocol)
class MemcacheServerProtocol(Protocol):
    """One client connection of the line protocol (see the module docstring).

    It is the transport's producer: when the client does not read its replies and the transport's
    write buffer fills up, the connection stops reading and parsing until the buffer drains, as memcached
    stops at a reply it cannot send; so a client that never reads holds a bounded amount of memory.
    """

    _log = Logger()
    #: ``IPlainGet.get_one`` of the backend, set when ``_plain_gets`` (only then does the parser hand keys over).
    _get_one: Callable[[bytes], tuple[int, bytes] | None]
    #: ``IGroupedPuts.execute_puts`` of the backend, set when ``_group_puts``.
    _execute_puts: Callable[[list[XPut]], list[Status | DomainError]]
    #: The backend as ``IForwardedGet``, or None.
    _forwarder: IForwardedGet | None

    def __init__(self, factory: MemcacheServerFactory) -> None:
        self.factory = factory
        #: Schedules the idle check; tests replace it with a ``Clock``'s.
        self.callLater: Callable[..., IDelayedCall] = factory.clock.callLater
        self._seconds = factory.clock.seconds
        plain_get, grouped_puts, forwarded = factory.plain_get, factory.grouped_puts, factory.forwarded_get
        self._plain_gets = plain_get is not None or forwarded is not None
        if plain_get is not None:
            self._get_one = plain_get.get_one
        self._forwarder = forwarded if plain_get is None else None
        self._group_puts = grouped_puts is not None
        if grouped_puts is not None:
            self._execute_puts = grouped_puts.execute_puts
        self._parser = RequestParser(
            factory.max_value_size, factory.max_line, factory.max_keys, plain_gets=self._plain_gets
        )
        self._execute: Callable[[Command], Any] = factory.backend.execute
        self._authenticated = factory.token is None
        #: The backend as ``IForwardedSet`` (None without, or until the token is proved).
        self._set_forwarder = factory.forwarded_set
        if not self._authenticated:  # until xauth proves the token: plain reads only
            self._execute = self._unauthenticated
            self._group_puts = False
            self._set_forwarder = None
        self._requests = factory.requests
        self._latency = factory.latency
        self._get_latency = factory.latency[Get] if factory.latency is not None else None
        self._queue: deque[Any] = deque()  # pending replies: [bytes | None, bytes charged] cells and _CLOSE
        self._held = 0  # bytes charged for the queue's cells (see the module docstring)
        self._out: list[bytes] = []  # replies to the current read, written together
        self._out_size = 0
        self._paused = False  # not parsing (nor reading, see _stop_reading), because of one of the three below
        self._reading_stopped = False  # the transport is paused (_stop_reading)
        self._full_for_memory = False  # _queue_full because of max_pending_bytes
        self._queue_full = False  # max_pending replies are pending
        self._writes_blocked = False  # the transport's write buffer is full
        self._turn_taken = False  # a bulk page ran: the rest waits for the reactor's next turn
        self._closing = False
        self._lost = False
        self._read_closed = False  # the client shut its write side: close once every reply is out
        # A meta command in several steps runs alone: it waits for the replies before it (``_held_command``), and
        # nothing after it runs until it is answered (``_barrier``), as memcached runs a connection's commands.
        # So does a command on a key that a pending command of this connection reads or writes (a backend that
        # answers later: a gateway), when one of the two writes it (``_waits``): ``_reading`` and ``_writing``
        # count the pending commands by key (b"" for a pending flush_all, which every command waits for).
        self._barrier = False
        self._held_command: Command | FailedRequest | None = None
        self._reading: dict[bytes, int] = {}
        self._writing: dict[bytes, int] = {}
        # lru_crawler metadump: streaming (a barrier too), from this ring position, the next page's call.
        self._dumping = False
        self._dump_after: tuple[int, bytes] | None = None
        self._dump_call: IDelayedCall | None = None
        self._in_process = False
        self._counted = False
        self._idle_call: IDelayedCall | None = None
        self._partial_call: IDelayedCall | None = None  # a command half-sent: closed at client_timeout
        #: When the client last sent something (the clock's seconds); its address and ours (``stats conns``).
        self.last_seen = 0.0
        self.peer = ""
        self.host = ""
        self._id = 0
        self._tr: Any = None  # the transport, typed loosely: TCP transports pause, resume and abort
        self._write: Callable[[bytes], object] = lambda data: None  # the transport's write_now (_transport.writer)

    # -- connection ------------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._tr = self.transport
        self._write = writer(self._tr)
        factory = self.factory
        if factory.curr_connections >= factory.max_connections and not factory.evict_idle():
            factory.rejected_connections += 1
            self._log.warn(
                "refusing a connection: {count} of {limit} open", count=factory.curr_connections,
                limit=factory.max_connections,
            )  # fmt: skip
            self._closing = True
            self._tr.write(_TOO_MANY_CONNECTIONS)
            self._tr.loseConnection()
            return
        self._counted = True
        factory.curr_connections += 1
        factory.total_connections += 1
        self._id = factory.register(self)
        self.peer = _address(getattr(self._tr, "getPeer", lambda: None)())
        self.host = _address(getattr(self._tr, "getHost", lambda: None)())
        self.last_seen = self._seconds()
        set_nodelay(self.transport)
        register = getattr(self._tr, "registerProducer", None)  # every TCP/TLS/UNIX transport has it
        if register is not None:
            register(self, True)  # told to pause when replies pile up unread
        if factory.idle_timeout > 0:
            self._idle_call = self.callLater(factory.idle_timeout, self._idle_check)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._closing = True
        if self._counted:
            self._counted = False
            self.factory.curr_connections -= 1
            self.factory.connections.pop(self._id, None)
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        if self._dump_call is not None and self._dump_call.active():
            self._dump_call.cancel()
        self._dump_call = None
        self._watch_partial()
        self._queue.clear()
        self._held = 0

    def readConnectionLost(self) -> None:
        """The client shut its write side: run what it sent (what a pause held back too, once it ends), write
        every reply, then close."""
        if self._read_closed:
            return
        self._read_closed = True
        if not self._paused and not self._closing:
            self._process()

    def writeConnectionLost(self) -> None:
        """Our write side is shut (we never do that ourselves): nothing more can be answered."""
        self._closing = True
        self._tr.loseConnection()

    def _idle_check(self) -> None:
        self._idle_call = None
        if self._closing:
            return
        timeout = self.factory.idle_timeout
        idle = self._seconds() - self.last_seen
        if self._queue or idle < timeout:  # busy, or active since the check was set
            self._idle_call = self.callLater(timeout - idle if not self._queue else timeout, self._idle_check)
            return
        self.factory.idle_closed += 1
        self._log.info("closing a connection idle for {idle:.0f}s", idle=idle)
        self._close_now()

    def _close_now(self) -> None:
        self._closing = True
        self._flush_out()
        self._tr.loseConnection()

    @property
    def idle(self) -> bool:
        """Nothing pending, nothing half-received: the connection may be closed to make room."""
        return not self._queue and not self._closing and not self._parser.in_request

    def evict(self) -> None:
        """Close this idle connection to make room for a new one."""
        self._close_now()

    def _watch_partial(self) -> None:
        """Arm the slow-client timer while a command is half-received (and reading goes on), else cancel it."""
        timeout = self.factory.client_timeout
        partial = timeout > 0 and not self._closing and not self._paused and self._parser.in_request
        call = self._partial_call
        if partial and call is None:
            self._partial_call = self.callLater(timeout, self._too_slow)
        elif not partial and call is not None:
            if call.active():
                call.cancel()
            self._partial_call = None

    def _too_slow(self) -> None:
        self._partial_call = None
        if self._closing or self._paused or not self._parser.in_request:
            return
        self.factory.slow_closed += 1
        self._log.info(
            "closing a connection from {peer}: a command half-sent for {timeout}s",
            peer=self.peer,
            timeout=self.factory.client_timeout,
        )
        self._close_now()

    # -- requests --------------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.last_seen = self._seconds()
        if self._plain_gets and not self._queue and not self._paused:
            key = self._parser.plain_get(data)
            if key is not None:  # the read is one plain get: no parsing loop, no reply list
                if self._forwarder is None:
                    self._plain_get(key, self._write)
                else:
                    self._forwarded(key)
                    self._flush_out()  # a declined get's reply, when it came at once
                return
        self._parser.feed(data)
        if self._paused:  # the client sends more while we wait: now the transport stops reading too
            self._stop_reading()
            return
        self._process()
        if self._partial_call is not None or self._parser.in_request:
            self._watch_partial()

    def _process(self) -> None:
        """Run the parsed commands until the buffer is empty, the queue is full or the connection closes;
        then write every reply they made at once."""
        next_event = self._parser.next
        handle = self._handle
        group_puts = self._group_puts
        puts: list[XPut] = []
        self._in_process = True
        try:
            while not self._paused and not self._closing and not self._barrier:
                event = next_event()
                if event is None:
                    break
                if isinstance(event, bytes):  # a plain get of this key (only with IPlainGet or IForwardedGet)
                    if puts:
                        self._run_puts(puts)
                        puts = []
                    if self._forwarder is None:
                        self._plain_get(event, self._reply)
                    else:
                        self._forwarded(event)
                    continue
                if group_puts and type(event) is XPut and not event.epoch:  # a fenced copy runs alone
                    puts.append(event)
                    if len(puts) >= _PUT_GROUP:
                        self._run_puts(puts)
                        puts = []
                    continue
                if puts:
                    self._run_puts(puts)
                    puts = []
                handle(event)
                if type(event) is XBulk and self._authenticated and self._parser.buffered:
                    self._take_turn()
        finally:
            self._in_process = False
            if puts:
                self._run_puts(puts)
            self._flush_out()
        if self._read_closed and not self._paused and not self._closing and not self._barrier:
            self._close_after_replies()  # all the half-closed client sent was run: close behind its replies

    def _flush_out(self) -> None:
        out = self._out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            self._out_size = 0
            if self._queue:  # more replies to come: the reactor sends them together
                self._tr.write(data)
            else:
                self._write(data)

    def _plain_get(self, key: bytes, send: Callable[[bytes], object]) -> None:
        """Answer ``get <key>`` with ``IPlainGet.get_one``; ``send`` takes the reply (the transport's
        ``write`` for a read that held only this get, else ``_reply``)."""
        histogram = self._get_latency
        start = perf_counter() if histogram is not None else 0.0
        try:
            found = self._get_one(key)
        except Exception:  # the engine failed: the general path words the error and logs it
            self._handle(Get((key,)))
            self._flush_out()
            return
        send(plain_get_reply(key, found))
        if histogram is not None:
            histogram.observe(perf_counter() - start)

    def _forwarded(self, key: bytes) -> None:
        """Answer ``get <key>`` with ``IForwardedGet.forward_get``: its reply takes a place in the queue of
        pending replies, as a Deferred's would; a declined get takes the general path."""
        forwarder = self._forwarder
        assert forwarder is not None
        writing = self._writing
        if not forwarder.forwarding or (writing and (key in writing or b"" in writing)):  # the general path waits
            self._handle(Get((key,)))
            return
        charge = self.factory.max_value_size + _VALUE_LINE  # as a Get of one key in flight (_charge)
        cell: list[Any] = [None, charge]
        queue = self._queue
        queue.append(cell)
        self._held += charge
        if not forwarder.forward_get(key, _Forwarded(self, cell)):
            queue.pop()  # the cell: nothing was queued behind it
            self._held -= charge
            self._handle(Get((key,)))
            return
        self._check_pending()

    def _handle(self, command: Command | FailedRequest) -> None:
        latency = self._latency
        start = perf_counter() if latency is not None else 0.0
        if type(command) in _LOCAL:
            if not self._authenticated and not self._open_local(command):
                self.factory.commands_refused += 1
                if not getattr(command, "noreply", False):
                    self._reply(error_reply(Unauthenticated()))
                return
            if isinstance(command, FailedRequest):
                self._failed_request(command)
                return
            self._local(cast(_LocalCommand, command))
            if latency is not None:
                latency[type(command)].observe(perf_counter() - start)
            return
        command = cast(Command, command)
        if (self._writing or self._reading) and self._waits(command):
            self._hold(command)
            return
        forwarded_set = self._set_forwarder is not None and type(command) is Store and command.mode == "set"
        if forwarded_set and self._forward_set(command, start):  # type: ignore[arg-type]  # a Store, as tested
            return
        try:
            result = self._execute(command)
        except DomainError as e:
            reply = self._error(error_reply(e))
        except Exception:
            self._log.failure("the backend failed on {command}", command=type(command).__name__)
            reply = self._error(error_reply(RuntimeError()))
        else:
            if type(result) not in _RESULTS and isinstance(result, Deferred):
                self._pending(command, result, start)
                return
            try:
                reply = serialize_result(command, result)
            except Exception:
                self._log.failure("cannot serialize the result of {command}", command=type(command).__name__)
                reply = self._error(error_reply(RuntimeError()))
        if latency is not None:
            latency[type(command)].observe(perf_counter() - start)
        # NOREPLY_COMMANDS have a noreply field (mypy cannot narrow a union by a set of types)
        if type(command) in NOREPLY_COMMANDS and command.noreply:  # type: ignore[union-attr]  # as said above
            return
        self._reply(reply)

    def _run_puts(self, puts: list[XPut]) -> None:
        """Run XPuts the backend groups in one transaction and queue their replies in order."""
        if len(puts) == 1:
            self._handle(puts[0])
            return
        start = perf_counter() if self._latency is not None else 0.0
        results: Sequence[Status | Exception]
        try:
            results = self._execute_puts(puts)
        except DomainError as e:  # the transaction failed: none of them is stored
            results = [e] * len(puts)
        except Exception:
            self._log.failure("the backend failed on {count} grouped xput", count=len(puts))
            results = [RuntimeError()] * len(puts)
        if self._latency is not None:  # each waited for the whole group
            histogram, elapsed = self._latency[XPut], perf_counter() - start
            for _ in puts:
                histogram.observe(elapsed)
        for put, result in zip(puts, results):
            if isinstance(result, BaseException):
                reply = self._error(error_reply(result))
            else:
                reply = serialize_result(put, result)
            if not put.noreply:
                self._reply(reply)

    def _reply(self, reply: bytes) -> None:
        """Queue ``reply`` behind the pending ones, or add it to this read's replies."""
        if self._queue:
            self._queue.append([reply, len(reply)])
            self._held += len(reply)
            self._check_pending()
        else:
            self._out.append(reply)
            self._out_size += len(reply)
            if self._out_size >= _FLUSH_AT:
                self._flush_out()  # big replies leave now, so that a full transport can pause us

    def _failed_reply(self, error: Any, what: str) -> bytes:
        """The error line for a forwarded request's ``error`` (an exception or a ``Failure`` of one), counted;
        an error that is not a domain error is logged (the backend failed on ``what``)."""
        if isinstance(error, Failure):
            error = error.value
        if not isinstance(error, DomainError):
            self._log.failure("the backend failed on {command}", Failure(error), command=what)
        return self._error(error_reply(error))

    def _error(self, reply: bytes) -> bytes:
        """Count the error ``reply`` (``SERVER_ERROR`` a server error, the others a client's) and return it."""
        if self._requests is not None:
            self._requests.error("line", "server" if reply.startswith(b"SERVER_ERROR") else "client")
        return reply

    def _failed_request(self, failed: FailedRequest) -> None:
        if failed.then is not None:
            if (self._writing or self._reading) and self._waits(failed.then):
                self._hold(failed)
                return
            self._run_silently(failed.then)
        reply = self._error(error_reply(failed.error))
        if failed.reply:
            self._reply(reply)
        if failed.close:
            self._close_after_replies()

    def _run_silently(self, command: Command) -> None:
        """Run a command whose reply nobody reads (a failed set's delete, with ``noreply``); its errors are only
        logged. One that answers later still takes its place in the order, so the commands after it see it."""
        try:
            result = self._execute(command)
        except DomainError:
            return
        except Exception:
            self._log.failure("the backend failed on {command}", command=type(command).__name__)
            return
        if type(result) not in _RESULTS and isinstance(result, Deferred):
            self._pending(command, result, perf_counter())

    # -- the order of a connection's commands on a key ------------------------------------------------------

    def _waits(self, command: Command) -> bool:
        """True when ``command`` must wait for pending commands of this connection: it writes a key one of
        them reads or writes, or reads a key one of them writes (or a flush_all is pending)."""
        writing = self._writing
        if b"" in writing:
            return True
        kind = type(command)
        if kind is Get:
            get = cast(Get, command)
            if get.exptime is None:
                return any(key in writing for key in get.keys)
            reading = self._reading
            return any(key in writing or key in reading for key in get.keys)
        if kind is FlushAll:
            return True
        key = getattr(command, "key", None)
        return key is not None and (key in writing or key in self._reading)

    def _track(self, command: Command, step: int) -> None:
        """Count ``command``'s keys in ``_reading`` or ``_writing`` (``step`` 1) or take them out (-1)."""
        kind = type(command)
        if kind is Get:
            get = cast(Get, command)
            keys: Sequence[bytes] = get.keys
            table = self._reading if get.exptime is None else self._writing
        elif kind is FlushAll:
            keys, table = (b"",), self._writing
        else:
            key = getattr(command, "key", None)
            if key is None:
                return
            keys, table = (key,), self._writing
        for key in keys:
            count = table.get(key, 0) + step
            if count:
                table[key] = count
            else:
                del table[key]

    def _hold(self, command: Command | FailedRequest) -> None:
        """Run ``command`` (and read what follows it) once every pending reply is written."""
        self._held_command = command
        self._barrier = True

    def _close_after_replies(self) -> None:
        self._closing = True
        if self._queue:
            self._queue.append(_CLOSE)
        else:
            self._close_now()

    @staticmethod
    def _open_local(command: Any) -> bool:
        """True for a local command a connection may send before it proved the token."""
        if type(command) is StatsCommand:
            return not command.group.startswith("reset")
        return type(command) in _OPEN_LOCAL

    def _unauthenticated(self, command: Command) -> Any:
        """The backend's ``execute`` for a connection that has not proved the token: plain reads run, every
        other command is refused."""
        if type(command) is Get and command.exptime is None:
            return self.factory.backend.execute(command)
        self.factory.commands_refused += 1
        raise Unauthenticated()

    def _authenticate(self, command: XAuth) -> None:
        """``xauth <token>``: OK and the connection may run everything, or a refusal that closes it."""
        factory = self.factory
        if factory.token is None or hmac.compare_digest(command.token, factory.token):
            self._authenticated = True
            self._execute = factory.backend.execute
            self._group_puts = factory.grouped_puts is not None
            self._set_forwarder = factory.forwarded_set
            self._reply(_OK)
            return
        factory.auth_failures += 1
        self._log.warn("wrong cluster token from {peer}; closing the connection", peer=self.peer)
        self._reply(error_reply(Unauthenticated(Unauthenticated.FAILED)))
        self._close_after_replies()

    def _local(self, command: _LocalCommand) -> None:
        """The commands this adapter answers itself."""
        if type(command) is XAuth:
            self._authenticate(command)
        elif type(command) is Quit:
            self._close_after_replies()
        elif type(command) is VersionCommand:
            self._reply(version_reply(self.factory.version))
        elif type(command) is Verbosity:
            if not command.noreply:
                self._reply(_OK)
        elif type(command) is StatsCommand:
            try:
                self._reply(self._stats(command.group))
            except Exception:
                self._log.failure("stats failed")
                self._reply(error_reply(RuntimeError()))
        elif type(command) is CacheMemlimit:
            reply = self._memlimit(command.mib)
            if not command.noreply:
                self._reply(reply)
        elif type(command) is Shutdown:
            self._shutdown(command.mode)
        elif type(command) is MetaCommand:
            self._meta(command)
        elif type(command) is LruCrawler:
            self._lru_crawler(command)
        elif type(command) is XMap:
            self._map(command)

    # -- xmap -------------------------------------------------------------------------------------------

    def _map(self, command: XMap) -> None:
        """``xmap <epoch>``: the gateway on this connection routes by the cluster map of that epoch. The
        backend learns it (a kvstore refuses read-modify-writes of older maps than the newest it knows), and
        the parser stamps it on this connection's ``xapply`` commands from now on (``XApply.epoch``). A
        backend that answers later (a gateway, which routes no ``xmap``) answers it as any command."""
        try:
            result = self._execute(command)
        except DomainError as e:
            self._reply(self._error(error_reply(e)))
            return
        except Exception:
            self._log.failure("the backend failed on XMap")
            self._reply(self._error(error_reply(RuntimeError())))
            return
        if isinstance(result, Deferred):
            self._pending(command, result, perf_counter())
            return
        self._parser.map_epoch = command.epoch  # the xapply commands parsed from now on carry it
        self._reply(serialize_result(command, result))

    # -- lru_crawler ------------------------------------------------------------------------------------

    def _lru_crawler(self, command: LruCrawler) -> None:
        """``lru_crawler``: its settings answer OK (there is no crawler); ``metadump`` streams every live item
        of the kvstore a page at a time, as memcached's crawler does (one line each, ``END`` last), alone on
        the connection: after the replies before it, before the commands after it, and only while the client
        reads (a page is written when the transport's buffer has room)."""
        if command.action == "ok":
            self._reply(_OK)
        elif command.action == "bad class":
            self._reply(b"BADCLASS invalid class id\r\n")
        elif not command.everything or self.factory.admin is None:
            self._reply(b"END\r\n")
        elif self._queue:
            self._hold(command)
        else:
            self._flush_out()
            self._barrier = self._dumping = True
            self._dump_after = None
            self._dump_page()

    def _dump_page(self) -> None:
        """Write the next page of a metadump; then schedule the one after it, or end the dump."""
        self._dump_call = None
        if self._lost or self._closing or self._writes_blocked:  # resumeProducing calls again
            return
        admin = self.factory.admin
        assert admin is not None
        now = int(self._seconds())
        try:
            items, self._dump_after = admin.dump_page(self._dump_after, _METADUMP_PAGE)
        except Exception:
            self._log.failure("lru_crawler metadump failed")
            items, self._dump_after = [], None
        lines = [
            b"key=%s exp=%d la=%d cas=%d fetch=no cls=1 size=%d\n"
            % (quote_from_bytes(key, safe="").encode(), record.expires_at or -1, now, record.version.cas,
               len(key) + len(record.value))
            for key, record in items
        ]  # fmt: skip
        if self._dump_after is None:
            lines.append(b"END\r\n")
        self._tr.write(b"".join(lines))
        if self._dump_after is not None:
            if not self._writes_blocked:
                self._dump_call = self.callLater(0, self._dump_page)
            return
        self._dumping = self._barrier = False
        if not self._in_process:
            self._process()

    # -- meta commands ---------------------------------------------------------------------------------

    def _meta(self, command: MetaCommand) -> None:
        """Run a meta command's steps through the backend; its reply takes its place in the order. Its steps
        read what the commands before it wrote and those after it see what it wrote: with replies pending
        (a gateway's), it waits for them, and holds the commands after it until its own reply is in."""
        if self._queue:
            self._hold(command)
            return
        reply = self._steps(meta_steps(command, self.factory.meta_state, self._seconds()), None)
        if isinstance(reply, Deferred):
            self._barrier = True
            self._later(reply)
            reply.addBoth(self._meta_answered)
        elif reply:
            self._reply(reply)

    def _meta_answered(self, _: object) -> None:
        """The meta command's reply is in: the commands behind it may run."""
        self._barrier = False
        if not self._in_process and not self._lost:
            self._process()

    def _run_held(self) -> None:
        """The replies before a held command are written: run it now, then what follows it."""
        command, self._held_command = self._held_command, None
        assert command is not None
        self._barrier = False
        self._handle(command)
        self._flush_out()
        if not self._barrier and not self._in_process:
            self._process()

    def _steps(self, steps: MetaSteps, result: Result | None) -> bytes | Deferred[bytes]:
        """Send ``result`` to the steps and run the commands they ask for until they give the reply; a
        Deferred of it when a command answers later. A backend error ends them with its reply line."""
        while True:
            try:
                command = steps.send(result)  # type: ignore[arg-type]  # None starts the generator
            except StopIteration as done:
                reply: bytes = done.value
                return reply
            except Exception:
                self._log.failure("a meta command failed")
                return self._error(error_reply(RuntimeError()))
            try:
                answer = self._execute(command)
            except DomainError as e:
                steps.close()
                return self._error(error_reply(e))
            except Exception:
                self._log.failure("the backend failed on {command}", command=type(command).__name__)
                steps.close()
                return self._error(error_reply(RuntimeError()))
            if type(answer) not in _RESULTS and isinstance(answer, Deferred):
                return answer.addCallbacks(self._next_step, self._step_failed, (steps,), errbackArgs=(steps,))
            result = answer

    def _next_step(self, result: Result, steps: MetaSteps) -> bytes | Deferred[bytes]:
        return self._steps(steps, result)

    def _step_failed(self, failure: Failure, steps: MetaSteps) -> bytes:
        steps.close()
        if not failure.check(DomainError):
            self._log.failure("the backend failed on a meta command", failure)
        return self._error(error_reply(failure.value or RuntimeError()))

    def _stats(self, group: str) -> bytes:
        name, _, argument = group.partition(" ")
        factory = self.factory
        if name == "":
            return stats_reply(factory.stats())
        if name == "settings":
            return stats_reply(factory.settings())
        if name == "items":
            return stats_reply(factory.items())
        if name == "slabs":
            return stats_reply(factory.slabs())
        if name == "sizes":
            return stats_reply([("sizes_status", "disabled")])
        if name == "conns":
            return stats_reply(factory.conns(self))
        if name == "cachedump":
            return self._cachedump(argument.split())
        if name == "reset":
            factory.reset()
            return b"RESET\r\n"
        if name == "detail":
            argument = argument.split(" ")[0]
            if argument in ("on", "off"):
                return _OK
            return b"END\r\n" if argument == "dump" else _STATS_USAGE
        return b"ERROR\r\n"

    def _cachedump(self, arguments: list[str]) -> bytes:
        """``stats cachedump <class> <limit>``: the items of pseudo class 1 (0 for the limit: as many as
        ``_DUMP_LIMIT``), memcached's errors for bad arguments."""
        if len(arguments) < 2:
            return b"CLIENT_ERROR bad command line\r\n"
        if not (arguments[0].isdigit() and arguments[1].isdigit()):
            return b"CLIENT_ERROR bad command line format\r\n"
        number, limit = int(arguments[0]), int(arguments[1])
        if number >= _SLAB_CLASSES:
            return b"CLIENT_ERROR Illegal slab id\r\n"
        admin = self.factory.admin
        if number != 1 or admin is None:
            return b"END\r\n"
        items = admin.dump_items(min(limit, _DUMP_LIMIT) if limit else _DUMP_LIMIT)
        return b"".join([*(b"ITEM %s [%d b; %d s]\r\n" % item for item in items), b"END\r\n"])

    def _memlimit(self, mib: int) -> bytes:
        """``cache_memlimit``: memcached's bounds and answers; the role changes the limit."""
        if mib < 8:
            return b"MEMLIMIT_TOO_SMALL cannot set maxbytes to less than 8m\r\n"
        if mib > 1_000_000_000:
            return b"MEMLIMIT_ADJUST_FAILED input value is megabytes not bytes\r\n"
        admin = self.factory.admin
        try:
            if admin is None:
                raise ValueError("this server has no memory limit")
            admin.set_memory_limit(mib * 1024 * 1024)
        except ValueError as e:
            return b"MEMLIMIT_ADJUST_FAILED " + str(e).encode("utf-8", "replace") + b"\r\n"
        self._log.info("memory limit set to {mib} MiB by cache_memlimit", mib=mib)
        return _OK

    def _shutdown(self, mode: str) -> None:
        """``shutdown``: refused unless enabled; else close this connection and stop the daemon."""
        stop = self.factory.shutdown
        if stop is None:
            self._reply(b"ERROR: shutdown not enabled\r\n")
        elif mode == "invalid":
            self._reply(b"CLIENT_ERROR invalid shutdown mode\r\n")
        else:
            self._log.info("shutdown asked by {peer}", peer=self.peer)
            self._close_now()
            stop()

    # -- replies that come later (a Deferred backend) ----------------------------------------------------

    def _charge(self, command: Command) -> int:
        """The bytes a request in flight is charged: a read, its keys at the value limit; others, a line."""
        if isinstance(command, Get):
            charge: int = len(command.keys) * (self.factory.max_value_size + _VALUE_LINE)
            return charge
        return _SMALL_REPLY

    def _pending(self, command: Command, result: Deferred[Result], start: float) -> None:
        charge = self._charge(command)
        cell: list[Any] = [None, charge]
        self._queue.append(cell)
        self._held += charge
        noreply = getattr(command, "noreply", False)
        histogram = self._latency[type(command)] if self._latency is not None else None
        self._track(command, 1)

        def done(value: Result | bytes) -> None:
            self._track(command, -1)
            try:  # bytes: a reply spliced from a kvstore's (a gateway's get with N=1)
                cell[0] = b"" if noreply else value if isinstance(value, bytes) else serialize_result(command, value)
            except Exception:
                self._log.failure("cannot serialize the result of {command}", command=type(command).__name__)
                cell[0] = self._error(error_reply(RuntimeError()))
            self._settle(cell)
            if histogram is not None:
                histogram.observe(perf_counter() - start)
            self._drain()

        def failed(failure: Failure) -> None:
            self._track(command, -1)
            if not failure.check(DomainError):
                self._log.failure("the backend failed on {command}", failure, command=type(command).__name__)
            reply = self._error(error_reply(failure.value or RuntimeError()))
            cell[0] = b"" if noreply else reply
            self._settle(cell)
            if histogram is not None:
                histogram.observe(perf_counter() - start)
            self._drain()

        result.addCallbacks(done, failed)
        self._check_pending()

    def _forward_set(self, command: Store, start: float) -> bool:
        """Offer ``set`` to ``IForwardedSet.forward_set``: its result takes a place in the queue of pending
        replies (``_SetReply``), as a Deferred's would (``_pending``); False when the backend declines."""
        forwarder = self._set_forwarder
        assert forwarder is not None
        cell: list[Any] = [None, _SMALL_REPLY]
        queue = self._queue
        queue.append(cell)
        self._held += _SMALL_REPLY
        self._track(command, 1)
        sink = _SetReply(self, command, cell, start)
        try:
            taken = forwarder.forward_set(command, sink)
        except Exception:  # answered as the general path answers a backend's failure
            if not sink.called:
                sink.errback(Failure())
            taken = True
        if not taken:
            queue.pop()  # the cell: nothing was queued behind it, nor answered
            self._held -= _SMALL_REPLY
            self._track(command, -1)
            return False
        self._check_pending()
        return True

    def _later(self, reply: Deferred[bytes]) -> None:
        """Queue a reply that comes later (b"" for none): a meta command's, made of several steps; it is
        written once it and those before it are. It is charged as a read of one key while in flight."""
        charge = self.factory.max_value_size + _VALUE_LINE
        cell: list[Any] = [None, charge]
        self._queue.append(cell)
        self._held += charge

        def done(value: bytes) -> None:
            cell[0] = value
            self._settle(cell)
            self._drain()

        def failed(failure: Failure) -> None:
            self._log.failure("a reply failed", failure)
            cell[0] = self._error(error_reply(RuntimeError()))
            self._settle(cell)
            self._drain()

        reply.addCallbacks(done, failed)
        self._check_pending()

    def _settle(self, cell: list[Any]) -> None:
        """A reply is done: it is charged its size from now on."""
        if not self._lost:
            size = len(cell[0])
            self._held += size - cell[1]
            cell[1] = size

    def _check_pending(self) -> None:
        """Stop reading once ``max_pending`` replies, or ``max_pending_bytes`` of them, are pending."""
        if self._queue_full:
            return
        factory = self.factory
        over_bytes = self._held >= factory.max_pending_bytes
        if over_bytes or len(self._queue) >= factory.max_pending:
            self._full_for_memory = over_bytes
            self._queue_full = True
            self._update_reading()

    def _drain(self) -> None:
        """Write the replies at the head of the queue that are done, in order; while the transport's write
        buffer is full they stay in the queue, counted, instead of piling up in the transport."""
        if self._lost:
            return
        queue = self._queue
        out = self._out
        if len(queue) == 1 and not out and not self._writes_blocked and queue[0] is not _CLOSE:
            # The common case, a client with one request in flight: its reply, done, leaves now (as the loop
            # below would write it, without gathering it in ``_out``).
            entry = queue[0]
            if entry[0] is not None:
                queue.clear()
                self._held -= entry[1]
                if entry[0]:
                    self._write(entry[0])
        else:
            while queue and (queue[0] is _CLOSE or queue[0][0] is not None):
                if self._writes_blocked and queue[0] is not _CLOSE:
                    break
                entry = queue.popleft()
                if entry is _CLOSE:
                    queue.clear()
                    self._held = 0
                    self._close_now()
                    return
                self._held -= entry[1]
                if entry[0]:
                    out.append(entry[0])
                    self._out_size += len(entry[0])
                    if self._out_size >= _FLUSH_AT:
                        self._flush_out()  # may block the transport: the loop then stops
            self._flush_out()
        if self._held_command is not None and not queue:
            self._run_held()
        factory = self.factory
        if self._queue_full and len(queue) <= factory.max_pending // 2 and self._held < factory.max_pending_bytes // 2:
            self._queue_full = False
            self._update_reading()

    # -- flow control: stop reading while replies cannot leave -----------------------------------------

    def pauseProducing(self) -> None:
        """The transport's write buffer is full (the client does not read its replies): stop reading."""
        self._writes_blocked = True
        self._update_reading()

    def resumeProducing(self) -> None:
        """The transport's write buffer drained: write what the queue held back, read and parse again (or go
        on with a metadump)."""
        self._writes_blocked = False
        if self._queue:
            self._drain()
        if self._dumping and self._dump_call is None:
            self._dump_call = self.callLater(0, self._dump_page)
        self._update_reading()

    def stopProducing(self) -> None:
        """The connection is going away."""
        self._closing = True

    def _take_turn(self) -> None:
        """After a bulk page (up to a few ms of work), read and parse no more until the reactor has polled
        once more, so that the other connections' requests that came meanwhile are served before the next
        page. A call the reactor runs before its next poll would parse a page already read before them (the
        reactor runs its due calls, then polls): hence two calls, the second scheduled by the first, which
        runs after that poll."""
        self._turn_taken = True
        self._update_reading()
        self.callLater(0, self.callLater, 0, self._next_turn)

    def _next_turn(self) -> None:
        self._turn_taken = False
        self._update_reading()

    def _update_reading(self) -> None:
        paused = self._queue_full or self._writes_blocked or self._turn_taken
        if paused == self._paused or self._lost:
            return
        self._paused = paused
        if (
            self._partial_call is None
            and not self._reading_stopped
            and not self._read_closed
            and not self._parser.in_request
        ):  # nothing read ahead or half-received, the transport reading: only the parsing pauses or resumes
            return  # (the common case: a get in flight reached the byte cap, and its reply ended it)
        if self._read_closed:  # nothing more to read: only the parsing pauses and resumes
            if not paused:
                self._process()
            return
        if paused:
            if self._parser.buffered:  # more was sent already: stop reading now
                self._stop_reading()
        else:
            if self._reading_stopped:
                self._reading_stopped = False
                self._tr.resumeProducing()
            if self._parser.buffered:
                self._process()  # what was read before the pause
        if self._partial_call is not None or self._parser.in_request:
            self._watch_partial()

    def _stop_reading(self) -> None:
        """Pause the transport while parsing is paused. Only once the client sent more than was parsed (in
        the read that paused parsing, or in a later one): a client with one request in flight sends nothing
        before its reply, and a single get in flight alone reaches the byte cap (it is charged the value
        limit), so pausing the transport at once cost two ``epoll_ctl`` calls and a resume a request. What
        is read meanwhile is one read of the transport's (64 KiB), kept unparsed."""
        if self._reading_stopped or self._lost or self._read_closed:
            return
        self._reading_stopped = True
        if self._queue_full and self._full_for_memory:
            self.factory.paused_for_memory += 1
        self._tr.pauseProducing()
