"""The line protocol's client: the pipelined connection a gateway (and a kvstore's handoff) keeps to a kvstore.

``KVClientProtocol.send(command)`` returns a Deferred of the result; replies are matched to requests in order
(a deque). ``send_many(commands)`` sends a group in one write, answered by one Deferred with each command's
result or ``Failure``. A request may have a timeout (the injected clock's); when it expires the connection is
dropped, since the replies behind it would come late too. The deadlines are checked by one timer per
connection, not one per request: replies come in order, so only the oldest pending request can be the first to
expire; the timer is due at its deadline and, when it fires, moves on to the next oldest (a timer that finds
nothing pending just ends). A lost connection fails every pending request with ``KVConnectionLost``, a timeout
with ``KVTimeout``; a kvstore's error reply fails its request with the domain error of ``chashd.errors``.
``noreply`` is never sent: every request gets its reply, so the pipeline cannot lose step. An ``XGet`` whose
line would pass ``XGET_LINE`` bytes (or hold more than ``XGET_KEYS`` keys) goes out as several ``xget`` lines in
one write, and its Deferred fires with their records joined: memcached's framing closes a connection on a line
past 16 KiB unless it is a get, which is what a kvstore of an earlier version does to a long ``xget``.

Given the cluster token, a connection proves it first (``xauth <token>``, the first request, pipelined with
what follows): this is the one place where gateways and the handoff authenticate to kvstores, so every
command they send, an internal verb added later included, goes over an authenticated connection. A kvstore
that refuses the token gets the connection dropped (and a logged error).

Bulk pages (``XBulk``, the handoff's): a connection made with ``probe_bulk`` asks the server first whether it
reads them (``BulkProbe``, pipelined behind what the connection sends first), and ``send_bulk`` sends pages
only on a connection whose server answered yes: a server of an earlier version answers the probe ``ERROR``,
and would read a page's bytes as commands. There ``send_bulk`` fails each page with ``BulkUnsupported``
without sending anything, and the sender falls back to ``xmove``. Each connection probes again, so a kvstore
restarted with another version between two connections is asked again.

A gateway names the cluster map epoch it routes by (``announce``: ``xmap <epoch>``, pipelined, once on each
new connection and again on each connection when the epoch changes, never per request), so a kvstore can
refuse the read-modify-writes of a gateway whose map is older than one it knows. A kvstore of an earlier version
answers ``ERROR``: that connection announces nothing more. An ``XPut`` with an ``epoch`` (the copy of a
read-modify-write's result) goes as ``xfence <epoch>`` and the ``xput``, one after the other on the connection;
a kvstore of an earlier version answers the ``xfence`` ``ERROR`` (a line without data: nothing else is misread)
and stores the ``xput`` unfenced, and that connection sends its next copies as plain ``xput``.

A read-modify-write's reads go as ``xlease`` (``XLease``: an ``xget`` of one key that leases it,
``chashd.leases``), and its command and copies (an ``XApply`` or ``XPut`` with a ``lease``) name the lease:
once the connection's kvstore has answered an ``xlease`` (it takes leases), in the ``xapply``'s extension
token and in the copy's ``xfence`` line (no line more than without leases); before that, as an
``xdeadline`` line before the command. A kvstore of an earlier version answers ``xlease`` and
``xdeadline`` with ``ERROR``: the ``xlease`` is sent again as ``xget`` and that connection sends its next
ones as ``xget``, and it stops sending ``xdeadline`` (the store went through without it). A command that is
over ends its leases with ``xrelease`` (``XRelease``); a kvstore that answers it ``ERROR`` (or takes no
leases) is sent no more: its leases run out by their deadline.

``KVClientPool`` keeps a few such connections to one kvstore, reconnecting with backoff.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, cast

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from chashd.bulk import BULK_FORMAT
from chashd.commands import (
    NOREPLY_COMMANDS,
    BulkFormat,
    BulkProbe,
    Command,
    NoreplyCommand,
    Quit,
    Result,
    SplicedGet,
    Status,
    Values,
    XApply,
    XAuth,
    XBulk,
    XDeadline,
    XEpoch,
    XFence,
    XGet,
    XLease,
    XMap,
    XPut,
    XRelease,
    XVer,
)
from chashd.errors import BulkUnsupported, DomainError, KeyLeased, ServiceUnavailable, UnknownCommand
from chashd.interfaces import IReplySink
from chashd.memcache._transport import set_nodelay
from chashd.memcache.text import BadReply, ReplyParser, fence_line, serialize_command

__all__ = ["KVClientPool", "KVClientProtocol", "KVConnectionLost", "KVTimeout"]

#: The longest ``xget`` line sent (under memcached's 16 KiB read buffer), and the most keys on one.
XGET_LINE = 16000
XGET_KEYS = 512


class KVConnectionLost(ServiceUnavailable):
    """The connection to a kvstore closed before it answered; the request may or may not have run."""


class KVTimeout(ServiceUnavailable):
    """A kvstore did not answer in time; the request may or may not have run."""


class _Group:
    """The answers to the commands of one ``send_many``: one pending entry per command shares it, in place
    of a Deferred each (a handoff sends hundreds at once). It takes each answer with ``callback`` or
    ``errback``, as a Deferred would, and fires ``done`` with them all, in order, after the last."""

    __slots__ = ("called", "done", "left", "results")

    def __init__(self, count: int) -> None:
        self.called = False  # the pending loop skips entries whose Deferred was called (cancelled)
        self.done: Deferred[list[Result | Failure]] = Deferred()
        self.left = count
        self.results: list[Result | Failure] = []

    def callback(self, result: Result) -> None:
        self.results.append(result)
        self._answered()

    def errback(self, error: BaseException | Failure) -> None:
        self.results.append(error if isinstance(error, Failure) else Failure(error))
        self._answered()

    def _answered(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.called = True
            if not self.done.called:  # not cancelled by the caller meanwhile
                self.done.callback(self.results)


def _as_request(command: Command) -> Command:
    """``command`` as the client sends it: without ``noreply`` (every request gets its reply, so that replies
    and requests stay in step). ``quit`` is refused: it is no request, the connection is closed instead."""
    kind = type(command)
    if kind in NOREPLY_COMMANDS:
        silenceable = cast(NoreplyCommand, command)
        if silenceable.noreply:
            return replace(silenceable, noreply=False)
    elif kind is Quit:
        raise ValueError("quit is not a request; close the connection instead")
    return command


#: What a pending ``forward_get`` waits for: a ``SplicedGet``'s reply (the key is not needed to read it).
_FORWARDED = SplicedGet(b"")

#: A pending request: the command, its Deferred (or its ``send_many`` group, or a ``forward_get``'s sink),
#: and when it was sent (the clock's seconds; 0 without a timeout).
_Request = tuple["Command | SplicedGet", "Deferred[Result] | _Group | IReplySink", float]


class KVClientProtocol(Protocol):
    """A pipelined client connection to a kvstore's line port (see the module docstring).

    ``clock`` and ``timeout``: each request fails with ``KVTimeout`` after ``timeout`` seconds (None:
    never), checked by one timer per connection. ``on_connect``/``on_lost`` tell a pool when the
    connection comes and goes. ``token``: the cluster token, proved first on every connection.
    ``probe_bulk``: ask the server whether it reads bulk pages (``send_bulk``).
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime | None = None,
        timeout: float | None = None,
        max_value_size: int = 128 * 1024 * 1024,
        on_connect: Callable[[KVClientProtocol], None] | None = None,
        on_lost: Callable[[KVClientProtocol], None] | None = None,
        token: bytes | None = None,
        probe_bulk: bool = False,
    ) -> None:
        if timeout is not None and clock is None:
            raise ValueError("a timeout needs a clock")
        self._clock = clock
        self._timeout = timeout
        self._seconds = clock.seconds if timeout is not None and clock is not None else None
        self._timer: IDelayedCall | None = None  # the deadline check, while requests may be pending
        self._parser = ReplyParser(max_value_size)
        self._pending: deque[_Request] = deque()
        self._connected = False
        self._lost_reason: str | None = None
        self._on_connect = on_connect
        self._on_lost = on_lost
        self._token = token
        self._probe_bulk = probe_bulk
        #: Whether the server reads bulk pages: None until the probe is answered (or the connection is lost).
        self.bulk: bool | None = None if probe_bulk else False
        self._bulk_waiters: list[Deferred[bool | None]] = []
        #: The map epoch announced on this connection (``announce``); None once the server refused ``xmap``.
        self.map_epoch: int | None = 0
        #: False once the server refused ``xfence`` (a kvstore of an earlier version): copies go unfenced.
        self.fences = True
        #: Whether the server takes ``xlease``: None until it answered one, False once it refused it (a kvstore
        #: of an earlier version: reads go as ``xget``).
        self.leases: bool | None = None
        #: False once the server refused ``xdeadline`` (a kvstore of an earlier version): stores go without.
        self.deadlines = True
        #: False once the server refused ``xrelease`` (a kvstore of an earlier version): leases run out there.
        self.releases = True
        self._tr: Any = None
        self.peer = "kvstore"

    @property
    def pending(self) -> int:
        """Requests sent and not answered yet."""
        return len(self._pending)

    @property
    def usable(self) -> bool:
        """True while requests can be sent."""
        return self._connected

    def connectionMade(self) -> None:
        self._tr = self.transport
        self._connected = True
        peer = self._tr.getPeer()
        self.peer = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}".rstrip(":")
        set_nodelay(self.transport)
        if self._token is not None:  # first on the connection: whatever follows runs authenticated
            self.send(XAuth(self._token)).addErrback(self._refused)
        if self._probe_bulk:  # after the token: a kvstore answers the probe only on a proved connection
            self.send(BulkProbe()).addCallbacks(self._bulk_answered, self._bulk_unanswered)
        if self._on_connect is not None:
            self._on_connect(self)

    def announce(self, epoch: int) -> None:
        """Name the cluster map epoch the commands sent from now on are routed by (``xmap <epoch>``, answered
        ``OK``), when it is newer than the one named last; nothing when not connected, or when the server
        refused it before (a kvstore of an earlier version)."""
        if not self._connected or self.map_epoch is None or epoch <= self.map_epoch:
            return
        self.map_epoch = epoch
        self.send(XMap(epoch)).addErrback(self._map_refused)

    def _map_refused(self, failure: Failure) -> None:
        """``ERROR`` (a kvstore of an earlier version, which fences nothing) or another refusal: announce no
        more on this connection; a lost connection is the pool's matter."""
        if failure.check(KVConnectionLost, KVTimeout):
            return
        if self.map_epoch is not None:
            self._log.info(
                "{peer} does not take the map epoch ({error}): its read-modify-writes are not fenced by epoch",
                peer=self.peer,
                error=failure.getErrorMessage(),
            )
        self.map_epoch = None

    def _refused(self, failure: Failure) -> None:
        """The kvstore did not take the token: nothing on this connection can work; drop it."""
        if failure.check(KVConnectionLost, KVTimeout):
            return  # the connection went away first; the pool reconnects
        self._log.error("{peer} refused the cluster token: {error}", peer=self.peer, error=failure.getErrorMessage())
        if self._connected:
            self._fail_all(KVConnectionLost(f"{self.peer} refused the cluster token"))
            self._tr.abortConnection()

    def _bulk_answered(self, result: Result) -> None:
        self.bulk = isinstance(result, BulkFormat) and result.version == BULK_FORMAT
        self._wake_bulk_waiters(self.bulk)

    def _bulk_unanswered(self, failure: Failure) -> None:
        """``ERROR`` (a server of an earlier version) or a refusal: no bulk pages here; a lost connection
        leaves the question open."""
        if failure.check(UnknownCommand) or failure.check(DomainError) and self._connected:
            self.bulk = False
        self._wake_bulk_waiters(self.bulk)

    def _wake_bulk_waiters(self, answer: bool | None) -> None:
        waiters, self._bulk_waiters = self._bulk_waiters, []
        for waiter in waiters:
            waiter.callback(answer)

    def send_bulk(self, commands: Sequence[XBulk | XEpoch]) -> Deferred[list[Result | Failure]]:
        """``send_many`` of bulk pages (each after the ``XEpoch`` of the handoff that pushes it) once the probe
        said the server reads them; else each command fails with ``BulkUnsupported`` (or ``KVConnectionLost``
        when the connection went before the answer), unsent."""

        def answered(speaks: bool | None) -> Deferred[list[Result | Failure]]:
            if speaks:
                return self.send_many(commands)
            error = self._not_connected() if speaks is None else BulkUnsupported(f"{self.peer} reads no bulk pages")
            return succeed([Failure(error) for _ in commands])

        if self.bulk is not None or not self._connected:
            return answered(self.bulk)
        waiter: Deferred[bool | None] = Deferred()
        self._bulk_waiters.append(waiter)
        return waiter.addCallback(answered)

    def send(self, command: Command) -> Deferred[Result]:
        """Send ``command``; the Deferred fires with its result or fails with a ``chashd.errors`` error."""
        if not self._connected:
            return fail(self._not_connected())
        kind = type(command)
        if kind is XGet:
            keys = command.keys  # type: ignore[union-attr]  # an XGet, as tested
            if len(keys) > 1 and (len(keys) > XGET_KEYS or sum(map(len, keys)) + len(keys) > XGET_LINE - 7):
                return self._send_split(keys)
        elif kind is XLease:
            return self._lease(cast(XLease, command))
        elif kind is XRelease and (not self.releases or self.leases is False):
            return succeed(Status.OK)  # nothing to end there (a kvstore of an earlier version)
        command = _as_request(command)
        deferred: Deferred[Result] = Deferred()
        leased = kind is XPut or kind is XApply
        wire = self._leased(command) if leased else serialize_command(command)  # type: ignore[arg-type]
        self._enqueue(command, deferred, wire)
        if kind is XRelease:
            deferred.addErrback(self._release_refused)
        return deferred

    def _release_refused(self, failure: Failure) -> Failure:
        """``ERROR``: a kvstore of an earlier version, whose leases run out by their deadline; send no more
        ``xrelease`` there. The failure goes on to the caller."""
        if failure.check(UnknownCommand):
            if self.releases:
                self._log.info("{peer} does not take xrelease: its leases run out by their deadline", peer=self.peer)
            self.releases = False
        return failure

    def _leased(self, command: XPut | XApply) -> bytes:
        """The bytes of an ``XPut`` or ``XApply`` with what goes just before it: its ``xfence`` (an ``XPut``
        with an epoch) and its lease. Where the kvstore takes leases, the lease goes in the ``xfence`` line or
        the ``xapply``'s extension token; elsewhere as an ``xdeadline`` line (none once refused)."""
        lease = command.lease
        if type(command) is XPut:
            if lease is not None and self.leases and command.epoch and self.fences and self.map_epoch is not None:
                fence: Deferred[Result] = Deferred()
                fence.addErrback(self._fence_refused)
                self._enqueue(XFence(command.epoch), fence, b"")
                return fence_line(command.epoch, lease) + serialize_command(command)
            wire = self._fence(command.epoch) if command.epoch else b""
        else:
            if lease is None or self.leases:
                return serialize_command(command)
            command = replace(command, lease=None)
            wire = b""
        if lease is not None and self.deadlines:
            deadline: Deferred[Result] = Deferred()
            deadline.addErrback(self._deadline_refused)
            line = XDeadline(lease)
            self._enqueue(line, deadline, b"")
            wire += serialize_command(line)
        return wire + serialize_command(command)

    def _deadline_refused(self, failure: Failure) -> None:
        """``ERROR``: a kvstore of an earlier version, which took the store without a deadline; send no more.
        A lost connection is the pool's matter."""
        if failure.check(KVConnectionLost, KVTimeout):
            return
        if self.deadlines:
            self._log.info(
                "{peer} does not take xdeadline ({error}): read-modify-writes are not bounded in time there",
                peer=self.peer,
                error=failure.getErrorMessage(),
            )
        self.deadlines = False

    def _lease(self, command: XLease) -> Deferred[Result]:
        """An ``XLease``, or its ``XGet`` where the server does not take ``xlease`` (it answered ``ERROR``:
        a kvstore of an earlier version; that answer sends it again as ``xget``)."""
        if self.leases is False:
            return self.send(XGet((command.key,)))
        deferred: Deferred[Result] = Deferred()
        self._enqueue(command, deferred, serialize_command(command))
        if self.leases:
            return deferred
        return cast(
            "Deferred[Result]", deferred.addCallbacks(self._lease_taken, self._lease_refused, errbackArgs=(command,))
        )

    def _lease_taken(self, result: Result) -> Result:
        """The kvstore answered an ``xlease``: it takes leases, in the ``xapply`` and ``xfence`` lines too."""
        self.leases = True
        return result

    def _lease_refused(self, failure: Failure, command: XLease) -> Any:
        """The fallback of an ``xlease`` answered ``ERROR``: the same read as ``xget``, from now on. A refusal
        for another lease (``KeyLeased``) says the kvstore takes leases."""
        if not failure.check(UnknownCommand):
            if failure.check(KeyLeased):
                self.leases = True
            return failure
        if self.leases:
            self._log.info("{peer} does not take xlease: its keys are not leased to read-modify-writes", peer=self.peer)
        self.leases = False
        return self.send(XGet((command.key,)))

    def _fence(self, epoch: int) -> bytes:
        """The ``xfence <epoch>`` to send just before the copy of a read-modify-write's result, in the same
        write (its answer is awaited first): the kvstore refuses the copy if it knows a newer map. Nothing
        where the server refused ``xmap`` or ``xfence`` before (a kvstore of an earlier version)."""
        if not self.fences or self.map_epoch is None:
            return b""
        fence: Deferred[Result] = Deferred()
        fence.addErrback(self._fence_refused)
        command = XFence(epoch)
        self._enqueue(command, fence, b"")
        return serialize_command(command)

    def _fence_refused(self, failure: Failure) -> None:
        """``ERROR``: a kvstore of an earlier version, which stored the copy unfenced; send no more fences. A
        lost connection is the pool's matter."""
        if failure.check(KVConnectionLost, KVTimeout):
            return
        if self.fences:
            self._log.info(
                "{peer} does not take xfence ({error}): copies of read-modify-writes are not fenced by epoch",
                peer=self.peer,
                error=failure.getErrorMessage(),
            )
        self.fences = False

    def forward_get(self, key: bytes, sink: IReplySink) -> bool:
        """Send ``get <key>``; its reply's bytes (``END``, or one ``VALUE`` block and ``END``) go to
        ``sink.callback``, an error to ``sink.errback`` as ``send``'s would fail. No Deferred, no command
        object: the gateway's busiest request. False, and nothing sent, when not connected."""
        if not self._connected:
            return False
        self._enqueue(_FORWARDED, sink, b"get " + key + b"\r\n")
        return True

    def send_to(self, command: Command, sink: IReplySink) -> bool:
        """``send`` whose result goes to ``sink.callback`` (an error to ``sink.errback``) in place of a
        Deferred; False, and nothing sent, when not connected. For one-key commands (no ``XGet`` split)."""
        if not self._connected:
            return False
        kind = type(command)
        if kind is XGet or kind is XVer:  # a gateway's quorum reads have no noreply to drop
            self._enqueue(command, sink, serialize_command(command))
            return True
        if kind is XLease:
            self._lease(cast(XLease, command)).addCallbacks(sink.callback, sink.errback)
            return True
        command = _as_request(command)
        leased = kind is XPut or kind is XApply
        wire = self._leased(command) if leased else serialize_command(command)  # type: ignore[arg-type]
        self._enqueue(command, sink, wire)
        return True

    def _enqueue(self, request: Command | SplicedGet, waiter: Deferred[Result] | IReplySink, wire: bytes) -> None:
        """Send ``wire``, the bytes of ``request``, whose answer goes to ``waiter``; its deadline starts now.
        (Empty ``wire``: the bytes go with the next request's, ``_fence``.)"""
        seconds = self._seconds
        if seconds is None:
            self._pending.append((request, waiter, 0.0))
        else:
            self._pending.append((request, waiter, seconds()))
            if self._timer is None:
                assert self._clock is not None and self._timeout is not None
                self._timer = self._clock.callLater(self._timeout, self._check_deadline)
        if wire:
            self._tr.write(wire)

    def send_many(self, commands: Sequence[Command]) -> Deferred[list[Result | Failure]]:
        """Send ``commands`` in one write; the Deferred fires once each is answered, with a list of each
        one's result or the ``Failure`` of its error, in order. For bulk senders (a handoff pushes a page
        of XPuts): one Deferred and one write for the group, in place of one Deferred and one write
        each. ``noreply`` is dropped as in ``send``; ``quit`` is refused. An ``XPut`` with an ``epoch`` is
        fenced as ``send`` fences it (its ``xfence`` goes just before it, in the same write, answered apart
        from the group)."""
        if not commands:
            return succeed([])
        if not self._connected:
            error = self._not_connected()
            return succeed([Failure(error) for _ in commands])
        requests = [_as_request(command) for command in commands]
        group = _Group(len(requests))
        seconds = self._seconds
        sent = seconds() if seconds is not None else 0.0
        pending = self._pending
        parts = []
        for command in requests:
            if type(command) is XPut or type(command) is XApply:
                parts.append(self._leased(command))  # queues the fence's and deadline's answers before its own
            else:
                parts.append(serialize_command(command))
            pending.append((command, group, sent))
        if seconds is not None and self._timer is None:
            assert self._clock is not None and self._timeout is not None
            self._timer = self._clock.callLater(self._timeout, self._check_deadline)
        self._tr.write(b"".join(parts))
        return group.done

    def _send_split(self, keys: tuple[bytes, ...]) -> Deferred[Result]:
        """An ``XGet`` of ``keys`` as several ``xget`` lines of at most ``XGET_LINE`` bytes and ``XGET_KEYS``
        keys, sent in one write; fires with every record they found, or fails with the first error."""
        chunks: list[XGet] = []
        start = 0
        size = 0
        for index, key in enumerate(keys):
            if index > start and (size + len(key) + 1 > XGET_LINE - 7 or index - start >= XGET_KEYS):
                chunks.append(XGet(keys[start:index]))
                start, size = index, 0
            size += len(key) + 1
        chunks.append(XGet(keys[start:]))
        return self.send_many(chunks).addCallback(_joined)

    def _not_connected(self) -> KVConnectionLost:
        return KVConnectionLost(f"not connected to {self.peer}: {self._lost_reason or 'not yet'}")

    def dataReceived(self, data: bytes) -> None:
        parser = self._parser
        parser.feed(data)
        pending = self._pending
        next_result = parser.next
        while pending:
            try:
                result = next_result(pending[0][0])
            except BadReply as e:
                self._log.error("bad reply from {peer}: {error}", peer=self.peer, error=str(e))
                self._fail_all(e)
                self._tr.abortConnection()
                return
            if result is None:
                return
            deferred = pending.popleft()[1]
            if deferred.called:  # cancelled by its caller
                continue
            if isinstance(result, DomainError):
                deferred.errback(result)
            else:
                deferred.callback(result)  # type: ignore[arg-type]  # bytes: a SplicedGet's reply
        if self._connected and parser.buffered:  # no request is waiting for these bytes
            self._log.error("{peer} sent bytes nobody asked for", peer=self.peer)
            self._tr.abortConnection()

    def _check_deadline(self) -> None:
        """The timer: fail the oldest pending request if its time is up, else wait for its deadline."""
        self._timer = None
        if not self._pending or not self._connected:
            return
        assert self._seconds is not None and self._timeout is not None and self._clock is not None
        oldest = self._pending[0]
        due = oldest[2] + self._timeout
        now = self._seconds()
        if now < due:
            self._timer = self._clock.callLater(due - now, self._check_deadline)
            return
        self._log.warn(
            "{peer} did not answer {command} within {timeout}s; dropping the connection",
            peer=self.peer,
            command=type(oldest[0]).__name__,
            timeout=self._timeout,
        )
        self._fail_all(KVTimeout(f"{self.peer} did not answer within {self._timeout}s"), first=oldest)
        self._tr.abortConnection()

    def _fail_all(self, error: DomainError, first: _Request | None = None) -> None:
        self._connected = False
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, deque()
        lost = KVConnectionLost(f"connection to {self.peer} closed before it answered: {error}")
        for request in pending:
            deferred = request[1]
            if not deferred.called:
                deferred.errback(error if request is first or first is None else lost)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost_reason = reason.getErrorMessage()
        was_connected = self._connected
        self._connected = False
        self._fail_all(KVConnectionLost(f"connection to {self.peer} lost: {self._lost_reason}"))
        if was_connected and self._on_lost is not None:
            self._on_lost(self)


def _joined(results: list[Result | Failure]) -> Result | Failure:
    """The records of the answers to a split ``XGet``, or the first failure among them."""
    items: list[Any] = []
    for result in results:
        if isinstance(result, Failure):
            return result
        items.extend(cast(Values, result).items)
    return Values(tuple(items))


class _PoolFactory(Factory):
    def __init__(self, pool: KVClientPool) -> None:
        self.pool = pool

    def buildProtocol(self, addr: IAddress | None) -> KVClientProtocol:
        pool = self.pool
        return KVClientProtocol(
            pool.clock,
            pool.timeout,
            pool.max_value_size,
            pool._connected,
            pool._lost,
            token=pool.token,
            probe_bulk=pool.probe_bulk,
        )


class KVClientPool(MultiService):
    """``size`` persistent connections to one kvstore, each reconnecting with backoff (``ClientService``),
    each proving ``token`` (the cluster token) first when given.

    ``send`` goes over the connected connection with the fewest pending requests; when none is connected
    it waits for the next connection attempt and fails with ``KVConnectionLost`` if that fails.
    ``probe_bulk``: each connection asks whether the server reads bulk pages (for ``send_bulk``).
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        size: int = 2,
        timeout: float | None = 5.0,
        connect_timeout: float = 5.0,
        max_value_size: int = 128 * 1024 * 1024,
        endpoint: IStreamClientEndpoint | None = None,
        max_backoff: float = 10.0,
        spill_at: int = 32,
        token: str | None = None,
        probe_bulk: bool = False,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # MultiService.__init__ has no annotations
        self.probe_bulk = probe_bulk
        self.clock: IReactorTime = reactor
        self.host = host
        self.port = port
        self.timeout = timeout
        self.max_value_size = max_value_size
        self.spill_at = spill_at
        self.token = token.encode() if token else None
        self.connections: list[KVClientProtocol] = []
        #: The map epoch each connection announces (0: none), new ones included (``announce``).
        self.map_epoch = 0
        if endpoint is None:
            endpoint = HostnameEndpoint(reactor, host, port, timeout=connect_timeout)
        factory = _PoolFactory(self)
        policy = backoffPolicy(initialDelay=0.1, maxDelay=max_backoff, factor=2.0)
        self._services = [ClientService(endpoint, factory, retryPolicy=policy, clock=reactor) for _ in range(size)]
        for service in self._services:
            service.setServiceParent(self)
        self._next = 0

    def announce(self, epoch: int) -> None:
        """Have every connection name ``epoch`` as the map epoch it routes by (``KVClientProtocol.announce``),
        now and once connected."""
        self.map_epoch = epoch
        for connection in self.connections:
            connection.announce(epoch)

    def _connected(self, protocol: KVClientProtocol) -> None:
        self.connections.append(protocol)
        if self.map_epoch:
            protocol.announce(self.map_epoch)
        self._log.debug("connected to {host}:{port}", host=self.host, port=self.port)

    def _lost(self, protocol: KVClientProtocol) -> None:
        if protocol in self.connections:
            self.connections.remove(protocol)

    def send(self, command: Command) -> Deferred[Result]:
        """Send ``command`` over the first usable connection, or the least busy one once that one has
        ``spill_at`` requests pending."""
        best = self._pick()
        if best is not None:
            return best.send(command)
        if not self.running:
            return fail(KVConnectionLost(f"the pool to {self.host}:{self.port} is stopped"))
        service = self._services[self._next % len(self._services)]
        self._next += 1
        waiting: Deferred[Any] = service.whenConnected(failAfterFailures=1)

        def connected(protocol: KVClientProtocol) -> Deferred[Result]:
            return protocol.send(command)

        def unreachable(failure: Failure) -> Failure:
            if failure.check(DomainError):
                return failure
            return Failure(KVConnectionLost(f"cannot connect to {self.host}:{self.port}: {failure.getErrorMessage()}"))

        return waiting.addCallback(connected).addErrback(unreachable)

    def forward_get(self, key: bytes, sink: IReplySink) -> bool:
        """``KVClientProtocol.forward_get`` over the connection ``send`` would take; False, and nothing sent,
        when none is connected (``send`` would wait for one)."""
        best = self._pick()
        return best is not None and best.forward_get(key, sink)

    def send_to(self, command: Command, sink: IReplySink) -> bool:
        """``KVClientProtocol.send_to`` over the connection ``send`` would take; False, and nothing sent,
        when none is connected."""
        best = self._pick()
        return best is not None and best.send_to(command, sink)

    def _pick(self) -> KVClientProtocol | None:
        """The first connected connection with fewer than ``spill_at`` requests pending, else the connected
        one with the fewest; None when none is connected."""
        best: KVClientProtocol | None = None
        for connection in self.connections:
            if connection._connected:
                pending = len(connection._pending)
                if pending < self.spill_at:
                    return connection
                if best is None or pending < len(best._pending):
                    best = connection
        return best

    def send_many(self, commands: Sequence[Command]) -> Deferred[list[Result | Failure]]:
        """``KVClientProtocol.send_many`` over the connected connection with the fewest pending requests
        (waiting for the next connection attempt when none is connected): each command's result or the
        ``Failure`` of its error, in order."""
        return self._send_group(commands, KVClientProtocol.send_many)

    def send_bulk(self, commands: Sequence[XBulk | XEpoch]) -> Deferred[list[Result | Failure]]:
        """``KVClientProtocol.send_bulk`` over a connection chosen as ``send_many`` chooses: each page's
        ``Bulked`` (each ``XEpoch``'s ``OK``), or the ``Failure`` of its error (``BulkUnsupported`` from a
        server that reads none)."""
        return self._send_group(commands, KVClientProtocol.send_bulk)  # type: ignore[arg-type]

    def _send_group(
        self,
        commands: Sequence[Command],
        send: Callable[[KVClientProtocol, Sequence[Command]], Deferred[list[Result | Failure]]],
    ) -> Deferred[list[Result | Failure]]:
        best: KVClientProtocol | None = None
        for connection in self.connections:
            if connection._connected and (best is None or len(connection._pending) < len(best._pending)):
                best = connection
        if best is not None:
            return send(best, commands)
        if not self.running:
            error = KVConnectionLost(f"the pool to {self.host}:{self.port} is stopped")
            return succeed([Failure(error) for _ in commands])
        service = self._services[self._next % len(self._services)]
        self._next += 1
        waiting: Deferred[Any] = service.whenConnected(failAfterFailures=1)

        def connected(protocol: KVClientProtocol) -> Deferred[list[Result | Failure]]:
            return send(protocol, commands)

        def unreachable(failure: Failure) -> list[Result | Failure]:
            error = KVConnectionLost(f"cannot connect to {self.host}:{self.port}: {failure.getErrorMessage()}")
            return [Failure(error) for _ in commands]

        return waiting.addCallbacks(connected, unreachable)
