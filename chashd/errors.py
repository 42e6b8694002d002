# -*- test-case-name: tests.unit.test_memcache_server,tests.unit.test_client -*-
"""Domain errors. Core code raises these; each adapter maps them to its wire in one place.

The message of a request error is the text memcached itself uses for the same fault where there is one
(``bad command line format``, ``bad data chunk``, ...), so the line protocol can answer exactly as
memcached does and the HTTP adapter can put the same words in a problem+json ``detail``.
"""

from __future__ import annotations

__all__ = [
    "BadCommand",
    "BadDataChunk",
    "BadKey",
    "BulkUnsupported",
    "ClusterMapUnavailable",
    "ConfigError",
    "DeadlinePassed",
    "DomainError",
    "KeyLeased",
    "MapNotCurrent",
    "NoNodes",
    "NodeConflict",
    "NodeLeaving",
    "NonNumericValue",
    "NotServing",
    "QuorumNotReached",
    "RequestError",
    "ServiceUnavailable",
    "StaleMap",
    "StaleVersion",
    "StorageError",
    "StorageFull",
    "UnknownCommand",
    "Unauthenticated",
    "UnknownNode",
    "ValueTooLarge",
    "VersionTooNew",
]


class DomainError(Exception):
    """Base of every error the daemons' code raises on purpose; each adapter maps it to its wire.

    Not to be confused with ``chashd.client.ChashError``, the failures the HTTP API's clients report.
    """


class ConfigError(DomainError):
    """A configuration value is missing or wrong. The message is one line naming the option."""


class StorageError(DomainError):
    """The storage engine cannot use its files: unreadable, corrupt, of an unknown schema, or failing writes.

    The message names the problem; ``detail`` (for the logs, never for clients) also names the file. At
    start the detail stops the daemon; the file is never replaced.
    """

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail or message


# -- the client's fault ----------------------------------------------------------------------------


class RequestError(DomainError):
    """The request is malformed or not allowed (memcached ``CLIENT_ERROR``, HTTP 4xx)."""


class UnknownCommand(RequestError):
    """A command the protocol does not have (memcached answers a bare ``ERROR``)."""

    def __init__(self, message: str = "unknown command") -> None:
        super().__init__(message)


class BadCommand(RequestError):
    """A command line that does not parse: wrong arguments, bad numbers, a line too long."""

    def __init__(self, message: str = "bad command line format") -> None:
        super().__init__(message)


class BadKey(BadCommand):
    """A key longer than 250 bytes, empty, or holding a space or control character."""


class BadDataChunk(RequestError):
    """A data block whose length does not match its command line."""

    def __init__(self, message: str = "bad data chunk") -> None:
        super().__init__(message)


class ValueTooLarge(RequestError):
    """A value over the configured maximum (memcached answers ``SERVER_ERROR object too large for cache``)."""

    def __init__(self, size: int, limit: int | None = None) -> None:
        # The limit is None when a server said so without giving it (a kvstore's SERVER_ERROR).
        if limit is None:
            super().__init__("object too large for cache")
        else:
            super().__init__(f"value of {size} bytes is over the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class NonNumericValue(RequestError):
    """``incr``/``decr`` on a value that is not a decimal number."""

    def __init__(self, message: str = "cannot increment or decrement non-numeric value") -> None:
        super().__init__(message)


class Unauthenticated(RequestError):
    """A command a kvstore's line port takes only from a connection that proved the cluster token
    (``xauth <token>``: ``REQUIRED``), or a token that is not the cluster's (``FAILED``)."""

    REQUIRED = "authentication required: send xauth <token> first"
    FAILED = "authentication failed: that is not the cluster's token"

    def __init__(self, message: str = REQUIRED) -> None:
        super().__init__(message)


class VersionTooNew(RequestError):
    """A version from the wire whose clock is further ahead of this node's than the allowed skew: a
    forgery or a broken clock, refused rather than stored (it would win over every later write)."""

    def __init__(self, version: object, skew_ms: int) -> None:
        super().__init__(f"version {version} is more than {skew_ms / 1000:g}s ahead of this node's clock")


class UnknownNode(RequestError):
    """A cluster-map request names a kvstore node the map does not hold (HTTP 404)."""


class NodeConflict(RequestError):
    """A registration clashes with the map: another live node has the id, or the announcement is stale (HTTP 409)."""


# -- the cluster's state ---------------------------------------------------------------------------


class ServiceUnavailable(DomainError):
    """The request was valid but cannot be served now (memcached ``SERVER_ERROR``, HTTP 503)."""


class NoNodes(ServiceUnavailable):
    """The ring has no node that can take the key."""

    def __init__(self, message: str = "no kvstore node is available for this key") -> None:
        super().__init__(message)


class QuorumNotReached(ServiceUnavailable):
    """Fewer replicas answered than the quorum needs; a write is not acknowledged."""

    def __init__(self, needed: int, got: int, what: str = "write") -> None:
        super().__init__(f"{what} quorum not reached: {got} of {needed} replicas answered")
        self.needed = needed
        self.got = got


class NodeLeaving(ServiceUnavailable):
    """This kvstore is draining and refuses new writes."""

    def __init__(self, message: str = "this node is leaving the ring and refuses writes") -> None:
        super().__init__(message)


class StaleVersion(ServiceUnavailable):
    """A versioned read-modify-write (``XApply``) whose version is not newer than the stored record's.

    The kvstore refuses it rather than applying it on top of a record it has not seen: either another
    write got there first (the gateway moves its clock past ``stored``, the stored version, and sends the
    command again), or the request is one the gateway gave up on long ago (a primary that was paused: it
    must not undo what came after it).
    """

    MESSAGE = "a newer version is stored than the version of this write"

    def __init__(self, stored: object = None) -> None:
        super().__init__(self.MESSAGE if stored is None else f"{self.MESSAGE}: {stored}")
        self.stored = stored


class BulkUnsupported(ServiceUnavailable):
    """A kvstore that does not read bulk pages (``xbulk``: a server of an earlier version); its records
    go as ``xmove``, one each."""

    def __init__(self, message: str = "the server does not read bulk pages") -> None:
        super().__init__(message)


class StorageFull(ServiceUnavailable):
    """The engine is at its size limit and may not make room: the memory engine at ``--memory-limit`` with
    ``--memory-full=error`` (or holding nothing it may evict), the SQLite engine at ``--disk-limit``.

    The message starts with memcached's words (``out of memory storing object``) for the memory engine;
    HTTP answers 507. Nothing was stored.
    """

    def __init__(self, message: str = "out of memory storing object", detail: str | None = None) -> None:
        super().__init__(message)
        #: More for the logs (the file whose disk is full), never for clients; None when there is nothing more.
        self.detail = detail


class StaleMap(ServiceUnavailable):
    """A kvstore refuses a read-modify-write (``XApply``) sent over a connection whose gateway announced an
    older cluster map (``XMap``) than the newest the kvstore knows (from another gateway, its ring watch or a
    handoff): that gateway may have picked another primary than the current map names. Nothing was applied.
    The gateway starts the command over once its own map reaches ``known``."""

    PREFIX = "stale cluster map: epoch "

    def __init__(self, sent: int, known: int) -> None:
        super().__init__(f"{self.PREFIX}{sent} is older than epoch {known} known here")
        self.sent = sent
        self.known = known


class KeyLeased(ServiceUnavailable):
    """A kvstore refuses a read-modify-write's lease request or store (``XLease``, or an ``XApply``/``XPut``
    after an ``XDeadline``) while another command's conflicting lease on the key lasts, until ``until``
    (Unix milliseconds, the kvstore's clock; ``chashd.leases``). Nothing was read into a lease or stored; the
    gateway waits until then and starts the command's round over."""

    PREFIX = "key leased by another read-modify-write until "

    def __init__(self, until: int) -> None:
        super().__init__(f"{self.PREFIX}{until}")
        self.until = until


class DeadlinePassed(ServiceUnavailable):
    """A kvstore refuses a read-modify-write's store (an ``XApply`` or the copy of its result) past its
    round's deadline, or an ``XApply`` whose version is past it (``chashd.leases``): nothing stored."""

    PREFIX = "read-modify-write past its deadline "

    def __init__(self, deadline: int, what: str = "") -> None:
        super().__init__(f"{self.PREFIX}{deadline}{what}")
        self.deadline = deadline


class MapNotCurrent(ServiceUnavailable):
    """A gateway whose cluster map may be stale refuses a read-modify-write: it has heard from no Raft leader
    within the election timeout, so another gateway may route the key to another primary (a node this one
    still sees down may be up again). Plain ``get`` and ``set`` still run: last writer wins by version."""

    MESSAGE = (
        "this gateway has heard from no Raft leader within the election timeout, so its cluster map may be "
        "stale: it runs no read-modify-write (get and set still work); retry, or send it to another gateway"
    )

    def __init__(self, message: str = MESSAGE) -> None:
        super().__init__(message)


class NotServing(ServiceUnavailable):
    """The process runs but its role does not serve yet: ``GET /health`` answers 503 problem+json with the
    message, the fields of ``report`` (those a healthy answer has; none named as a problem+json member:
    ``type``, ``title``, ``status``, ``detail``), ``serving: false``, and ``Retry-After``. A gateway says so
    until it is in the cluster map it serves (``GatewayService.health``)."""

    def __init__(self, message: str, report: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.report = report or {}


class ClusterMapUnavailable(ServiceUnavailable):
    """A cluster-map change was not confirmed (no Raft leader, leader changed, timeout, stopping).

    The change may or may not have been applied; every change is idempotent, so it is safe to retry. With
    ``submitted`` False it was refused before it reached Raft (no leader known, or none heard from within the
    election timeout): it was not applied.
    """

    def __init__(self, reason: str, submitted: bool = True) -> None:
        if submitted:
            message = (
                f"the cluster map change was not confirmed ({reason}): it may or may not have been applied; "
                "it is safe to retry"
            )
        else:
            message = (
                f"the cluster map change was refused ({reason}); nothing was applied: retry, or ask another gateway"
            )
        super().__init__(message)
        self.reason = reason
        self.submitted = submitted
