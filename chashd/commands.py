# -*- test-case-name: tests.unit.test_memcache_text,tests.unit.test_semantics -*-
"""The key-value commands both surfaces speak, and their results.

The line protocol parses bytes into these commands (``chashd.memcache.text``), the HTTP adapter builds
them from requests (``chashd.web``), and a role's backend (``IKeyValue.execute``) runs them: the kvstore
against its engine, the gateway by routing them to kvstores. Results come back as the values below and
each adapter serializes them; faults are the exceptions of ``chashd.errors``.

Keys are ``bytes`` here (1-250 bytes, no space or control character); values are ``bytes``.

Besides memcached's commands there is a small extension the gateways and the handoff use between
themselves and kvstores (it carries versions, which memcached's commands cannot):

- ``XGet(keys)``: the stored records, tombstones and expired ones included, with their versions;
- ``XVer(key)``: only the version of the key's stored record (``VersionOf``): a gateway's quorum read asks the
  replicas after the first for no more than that;
- ``XPut(key, record)``: keep ``record`` if it is newer than what is stored (idempotent); a handoff sends it
  with ``handoff=True``, after an ``XEpoch(epoch)`` naming the ring it pushes for (a node that sees a ring newer
  than its own stops dropping records until it knows that ring);
- ``XApply(version, command)``: run a memcached write command (a read-modify-write such as ``incr``,
  ``cas``, ``append``, ``add``) here, stamping the result with ``version``, and return both the memcached
  result and the record it left, so the caller can copy that record to the other replicas;
- ``XMap(epoch)``: the epoch of the cluster map a gateway routes the commands that follow on this connection
  by; a kvstore refuses an ``XApply`` from a connection whose map is older than the newest it knows
  (``StaleMap``): two gateways whose maps differ may name two primaries for a key;
- ``XFence(epoch)``: the next ``XPut`` on this connection copies the result of a read-modify-write run by the
  map of ``epoch`` (stamped on it as ``XPut.epoch``); a kvstore that knows a newer map refuses that copy
  (``StaleMap``, nothing stored), so a primary a newer map no longer names gets no result acknowledged;
- ``XLease(key, lease)``: ``XGet`` of one key for a read-modify-write, which also leases the key to the
  command (``Lease``: its holder id, its round's deadline, shared or exclusive; ``chashd.leases``); a kvstore
  refuses it (``KeyLeased``) while a conflicting lease of another command lasts;
- ``XDeadline(lease)``: the next ``XApply`` or ``XPut`` on this connection is a store of that command's round
  (stamped on it as its ``lease``): a kvstore refuses it past the deadline (``DeadlinePassed``) or while a
  conflicting lease lasts (``KeyLeased``);
- ``XRelease(key, holder, deadline, floor)``: the read-modify-write ``holder`` is over: its lease on ``key``
  here (of the round of ``deadline`` or an earlier one) ends, at once, or (``floor``: the newest version it
  may have stored anywhere, Unix milliseconds) once the kvstore's clock is past that plus twice the clock
  bound;
- ``XAuth(token)``: prove the cluster token on this connection; a kvstore given a token takes the
  extension, ``flush_all`` and writes only from a connection that did;
- ``XBulk(count, block)``: keep each of ``count`` records of a page (``chashd.bulk``) that is newer than what
  is stored, in one grouped write; the handoff's way of moving records (``BulkProbe`` asks whether a server
  speaks it: one of an earlier version answers it ``ERROR``, as any unknown command).

and two that kvstores use between themselves for anti-entropy (``chashd.kvstore.antientropy``), on a hash
range ``[first, last]`` of the ring whose placement is ``placement`` (``antientropy.placement_id``; a node
whose data does not conform to that placement refuses them):

- ``XDigest(placement, first, last, parts, sender)``: the ``chashd.digests.RangeDigest`` of each of
  ``parts`` equal sub-ranges (``Digests``);
- ``XList(placement, first, last, limit, after)``: up to ``limit`` ``(hash, key, version)`` of the range in
  ``(hash, key)`` order, after the position ``after`` (``KeyVersions``).

Pure: no Twisted, no clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal, TypeAlias, get_args

from chashd.digests import RangeDigest
from chashd.record import Record
from chashd.versions import Version

__all__ = [
    "NOREPLY_COMMANDS",
    "Arith",
    "BulkFormat",
    "BulkProbe",
    "Bulked",
    "CacheMemlimit",
    "LruCrawler",
    "Command",
    "Delete",
    "Digests",
    "FlushAll",
    "Get",
    "KeyVersions",
    "MetaCommand",
    "NoreplyCommand",
    "SplicedGet",
    "Number",
    "Quit",
    "Result",
    "Shutdown",
    "StatsCommand",
    "StatsResult",
    "Status",
    "Store",
    "StoreMode",
    "Touch",
    "Values",
    "VersionCommand",
    "VersionOf",
    "Verbosity",
    "WriteCommand",
    "XApply",
    "XApplied",
    "XAuth",
    "XBulk",
    "XDigest",
    "XEpoch",
    "XFence",
    "Lease",
    "XDeadline",
    "XGet",
    "XLease",
    "XList",
    "XMap",
    "XPut",
    "XRelease",
    "XVer",
]

StoreMode: TypeAlias = Literal["set", "add", "replace", "append", "prepend", "cas"]


# -- memcached's commands --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Get:
    """``get``/``gets`` (``cas=True``) and ``gat``/``gats`` (``exptime`` given: touch while reading)."""

    keys: tuple[bytes, ...]
    cas: bool = False
    exptime: int | None = None


@dataclass(frozen=True, slots=True)
class Store:
    """``set``, ``add``, ``replace``, ``append``, ``prepend`` and ``cas`` (``cas_unique`` given)."""

    mode: StoreMode
    key: bytes
    flags: int
    exptime: int
    value: bytes
    cas_unique: int | None = None
    noreply: bool = False


@dataclass(frozen=True, slots=True)
class Delete:
    """``delete <key>``; with ``cas_unique`` (a meta ``md`` with ``C``) only while that is the item's cas."""

    key: bytes
    noreply: bool = False
    cas_unique: int | None = None


@dataclass(frozen=True, slots=True)
class Arith:
    """``incr``/``decr`` by an unsigned 64-bit ``delta``.

    What a meta ``ma`` adds: ``cas_unique`` (only while that is the item's cas), ``exptime`` (the TTL the
    item gets on success), ``vivify`` (on a miss, create the item with the number ``initial`` and this
    exptime, and answer ``initial``).
    """

    key: bytes
    delta: int
    incr: bool = True
    noreply: bool = False
    cas_unique: int | None = None
    exptime: int | None = None
    vivify: int | None = None
    initial: int = 0


@dataclass(frozen=True, slots=True)
class Touch:
    """``touch <key> <exptime>``."""

    key: bytes
    exptime: int
    noreply: bool = False


@dataclass(frozen=True, slots=True)
class FlushAll:
    """``flush_all [delay]``: invalidate every item now, or ``delay`` seconds from now."""

    delay: int = 0
    noreply: bool = False


@dataclass(frozen=True, slots=True)
class StatsCommand:
    """``stats [group]``."""

    group: str = ""


@dataclass(frozen=True, slots=True)
class VersionCommand:
    """``version``."""


@dataclass(frozen=True, slots=True)
class Verbosity:
    """``verbosity <level>``."""

    level: int
    noreply: bool = False


@dataclass(frozen=True, slots=True)
class Quit:
    """``quit``: the server closes the connection."""


@dataclass(frozen=True, slots=True)
class CacheMemlimit:
    """``cache_memlimit <MiB> [noreply]``: change the memory engine's limit at run time."""

    mib: int
    noreply: bool = False


@dataclass(frozen=True, slots=True)
class LruCrawler:
    """``lru_crawler <action> ...``: ``metadump`` lists the items (``everything``: of every class asked for,
    pseudo class 1 holding them all; False: only other classes, which are empty); ``ok`` is a setting of the
    crawler (``crawl``, ``sleep``, ``tocrawl``, ``enable``, ``disable``: there is no crawler, so they change
    nothing); ``bad class`` is a metadump of a class id memcached refuses."""

    action: str
    everything: bool = False


@dataclass(frozen=True, slots=True)
class Shutdown:
    """``shutdown [graceful]``: stop the daemon, when it was started with ``--enable-shutdown``.

    ``mode`` is ``""``, ``"graceful"``, or ``"invalid"`` (another argument: memcached's ``CLIENT_ERROR
    invalid shutdown mode`` once shutdown is enabled)."""

    mode: str = ""


@dataclass(frozen=True, slots=True)
class MetaCommand:
    """A meta command (``mg``, ``ms``, ``md``, ``ma``, ``mn``, ``me``; ``chashd.memcache.meta`` runs it as
    classic commands): ``verb``, ``key``, the flag tokens as sent (``tokens``, for the order of the reply)
    and what they say, already checked by the parser.

    ``mode`` is the M token's character; ``ttl`` the T token, ``vivify`` N, ``recache`` R (memcached
    exptimes); ``client_flags`` F; ``cas`` C; ``delta`` D, ``initial`` J; ``invalidate`` I; ``value`` the
    data block of an ``ms``; ``noreply`` q.
    """

    verb: str
    key: bytes = b""
    tokens: tuple[bytes, ...] = ()
    value: bytes = b""
    noreply: bool = False
    mode: str = ""
    ttl: int | None = None
    vivify: int | None = None
    recache: int | None = None
    client_flags: int = 0
    cas: int | None = None
    delta: int = 1
    initial: int = 0
    invalidate: bool = False

    def has(self, flag: str) -> bool:
        """True when a token starts with ``flag``."""
        code = ord(flag)
        return any(token[0] == code for token in self.tokens)


# -- the versioned extension -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class XGet:
    """Fetch the stored records with versions, tombstones and expired records included."""

    keys: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Lease:
    """A read-modify-write round's claim on a key (``chashd.leases``): the command's ``holder`` id (the
    gateway's id and a number), its round's ``deadline`` (Unix milliseconds), and whether it is exclusive (a
    failover) or shared (a command at the map's primary)."""

    holder: str
    deadline: int
    exclusive: bool = False


@dataclass(frozen=True, slots=True)
class XLease:
    """``XGet`` of ``key`` for a read-modify-write, leasing the key to ``lease``'s command (answered with
    ``Values``; ``KeyLeased`` while another command's conflicting lease lasts)."""

    key: bytes
    lease: Lease
    #: The map epoch its connection named (``xmap``, stamped by the parser; 0: none): leases of commands run
    #: by two maps conflict (``chashd.leases``).
    epoch: int = 0


@dataclass(frozen=True, slots=True)
class XDeadline:
    """The next ``XApply`` or ``XPut`` on this connection is a store of ``lease``'s round (answered ``OK``;
    a kvstore of an earlier version answers ``ERROR`` and takes that store without it)."""

    lease: Lease


@dataclass(frozen=True, slots=True)
class XRelease:
    """The read-modify-write ``holder`` is over (completed, failed, or changed nothing), or its round was
    refused: its lease on ``key`` here ends (answered ``OK``; a kvstore of an earlier version answers
    ``ERROR``). ``deadline`` is the last round's deadline the gateway sent here: a lease a later round of
    the same command took (its request overtook this on another connection) is left alone. ``floor`` (Unix
    milliseconds; 0: none) is the newest version's milliseconds that command may have stored anywhere
    without its result being acknowledged: the lease then lasts until the kvstore's clock passes ``floor``
    plus twice the clock bound (if it would end later), so that whatever it left is older than the next
    command's version (``chashd.leases``)."""

    key: bytes
    holder: str
    deadline: int
    floor: int = 0


@dataclass(frozen=True, slots=True)
class XVer:
    """Fetch only the version of ``key``'s stored record (a tombstone's or an expired record's too)."""

    key: bytes


@dataclass(frozen=True, slots=True)
class XPut:
    """Keep ``record`` for ``key`` if it is newer than the stored one.

    ``handoff`` marks a record pushed by a rebalancing handoff (the wire verb ``xmove``), so that the
    receiver can count what it got from handoffs apart from the gateways' replication and read repair.

    ``epoch`` (not 0) marks the copy of a read-modify-write's result, run by the cluster map of that epoch: a
    kvstore that knows a newer map refuses it (``StaleMap``). On the wire it is an ``xfence <epoch>`` sent
    just before the ``xput`` (``XFence``), which the kvstore's parser stamps on that ``xput``; a plain
    ``xput`` (0) is never fenced. ``lease`` (the copy's command round, ``xdeadline`` before it on the wire):
    refused past its deadline or while a conflicting lease lasts.
    """

    key: bytes
    record: Record
    noreply: bool = False
    handoff: bool = False
    epoch: int = 0
    lease: Lease | None = None


@dataclass(frozen=True, slots=True)
class XEpoch:
    """The epoch of the ring the handoff pushes the records that follow for (answered ``OK``)."""

    epoch: int


WriteCommand: TypeAlias = Store | Delete | Arith | Touch


@dataclass(frozen=True, slots=True)
class XApply:
    """Run a write ``command`` here with ``version`` as the version of the record it writes.

    ``epoch``: the map epoch its connection announced (``XMap``), set by the kvstore's line protocol, never
    sent (0: none announced, a gateway of an earlier version). ``lease``: the command's round (an
    ``XDeadline`` before it on the wire): refused past its deadline, with a version past it, or while a
    conflicting lease lasts."""

    version: Version
    command: WriteCommand
    epoch: int = 0
    lease: Lease | None = None


@dataclass(frozen=True, slots=True)
class XMap:
    """The epoch of the cluster map the sender routes the commands that follow by (answered ``OK``)."""

    epoch: int


@dataclass(frozen=True, slots=True)
class XFence:
    """The next ``xput`` on this connection is the copy of a read-modify-write's result run by the cluster
    map of ``epoch`` (answered ``OK``; a kvstore of an earlier version answers ``ERROR`` and stores that
    ``xput`` unfenced)."""

    epoch: int


@dataclass(frozen=True, slots=True)
class XAuth:
    """Prove the cluster token on this connection (never shown in a repr or a log)."""

    token: bytes

    def __repr__(self) -> str:
        return "XAuth(token=***)"


@dataclass(frozen=True, slots=True)
class SplicedGet:
    """A plain ``get`` of one key sent by a gateway whose reply it takes as it came, ``END`` or one ``VALUE``
    block and ``END`` (``bytes``), to hand it to its client unchanged: no record is built. Not a command a
    server parses: on the wire it is ``get <key>``."""

    key: bytes


@dataclass(frozen=True, slots=True)
class XBulk:
    """Keep each record of a page (``chashd.bulk``: ``count`` rows in ``block``) that is newer than the stored
    one, in one grouped write; answered once the write is committed."""

    count: int
    block: bytes


@dataclass(frozen=True, slots=True)
class BulkProbe:
    """Does this server speak ``XBulk``? (A bare ``xbulk`` line, answered with the page format it reads.)"""


@dataclass(frozen=True, slots=True)
class XDigest:
    """The digests of ``parts`` equal sub-ranges of ``[first, last]`` (anti-entropy), asked by ``sender``
    (a node id; empty when not given)."""

    placement: str
    first: int
    last: int
    parts: int
    sender: str = ""


@dataclass(frozen=True, slots=True)
class XList:
    """Up to ``limit`` ``(hash, key, version)`` of ``[first, last]``, after ``after`` (anti-entropy)."""

    placement: str
    first: int
    last: int
    limit: int
    after: tuple[int, bytes] | None = None


Command: TypeAlias = (
    Get
    | Store
    | Delete
    | Arith
    | Touch
    | FlushAll
    | StatsCommand
    | VersionCommand
    | Verbosity
    | Quit
    | CacheMemlimit
    | Shutdown
    | LruCrawler
    | MetaCommand
    | XGet
    | XVer
    | XPut
    | XApply
    | XAuth
    | XBulk
    | BulkProbe
    | XDigest
    | XList
    | XEpoch
    | XMap
    | XFence
    | XLease
    | XDeadline
    | XRelease
)

#: The commands with a ``noreply`` flag: when it is set, nothing is answered to them, errors included.
NoreplyCommand: TypeAlias = Store | Delete | Arith | Touch | FlushAll | Verbosity | CacheMemlimit | XPut
#: The types of ``NoreplyCommand``, for a test at run time (``type(command) in NOREPLY_COMMANDS``).
NOREPLY_COMMANDS: frozenset[type[NoreplyCommand]] = frozenset(get_args(NoreplyCommand))


# -- results ---------------------------------------------------------------------------------------


class Status(enum.Enum):
    """The one-word replies of memcached's write commands."""

    STORED = "STORED"
    NOT_STORED = "NOT_STORED"
    EXISTS = "EXISTS"
    NOT_FOUND = "NOT_FOUND"
    DELETED = "DELETED"
    TOUCHED = "TOUCHED"
    OK = "OK"


@dataclass(frozen=True, slots=True)
class Values:
    """The answer to ``Get`` (live records only, in request order) or ``XGet`` (every stored record)."""

    items: tuple[tuple[bytes, Record], ...]


@dataclass(frozen=True, slots=True)
class VersionOf:
    """The answer to ``XVer``: the stored record's version, None when no record is stored."""

    version: Version | None


@dataclass(frozen=True, slots=True)
class Number:
    """The new value after ``incr``/``decr``."""

    value: int


@dataclass(frozen=True, slots=True)
class StatsResult:
    """``STAT name value`` lines."""

    items: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class XApplied:
    """The answer to ``XApply``: memcached's result, and the record the command left (None: unchanged)."""

    result: Status | Number
    record: Record | None


@dataclass(frozen=True, slots=True)
class Bulked:
    """The answer to ``XBulk``: the records stored, and those kept out because an equal or newer version
    was stored already."""

    stored: int
    kept: int


@dataclass(frozen=True, slots=True)
class BulkFormat:
    """The answer to ``BulkProbe``: the page format (``chashd.bulk.BULK_FORMAT``) the server reads."""

    version: int


@dataclass(frozen=True, slots=True)
class Digests:
    """The answer to ``XDigest``: the digest of each sub-range, in order."""

    items: tuple[RangeDigest, ...]


@dataclass(frozen=True, slots=True)
class KeyVersions:
    """The answer to ``XList``: ``(hash, key, version)`` in ``(hash, key)`` order."""

    items: tuple[tuple[int, bytes, Version], ...]


Result: TypeAlias = (
    Status | Values | Number | StatsResult | XApplied | Bulked | BulkFormat | Digests | KeyVersions | VersionOf
)
