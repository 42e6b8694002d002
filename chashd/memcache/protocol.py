"""The memcached line protocol on Twisted: the server over an ``IKeyValue`` backend, and the client.

Server (``MemcacheServerFactory``/``MemcacheServerProtocol``): bytes go to the pure ``RequestParser``
of ``chashd.memcache.text``, which does memcached's framing (a line, then a declared data block, or a
skipped one) with memcached's limits; this is why the protocol is a plain ``Protocol`` rather than a
``LineReceiver``: memcached accepts a bare LF, reads a whole line past 2048 bytes when it came in one
read but closes on 2048 bytes without a newline (except a multi-key get), which ``MAX_LENGTH`` cannot
say. Memory per connection stays bounded by the parser's limits (a line, a data block of at most the
value limit + 2 bytes) and by the cap on pending replies.

- Consecutive ``XPut`` commands of one read (a handoff pipelines hundreds) go to the backend's
  ``execute_puts`` in one call when it has one, so that the kvstore commits them in one transaction.
- Replies leave in request order. A backend result that is not a Deferred is written inline (all the
  replies to one read go out in one write); a Deferred goes into a queue of pending replies, each written
  when it and every one before it are done. When ``max_pending`` replies are pending the connection stops
  reading (``pauseProducing``) and parsing, and resumes when half of them have left. Likewise while the
  transport's write buffer is full (a client that does not read its replies): the protocol is the
  transport's streaming producer.
- Errors are mapped to the wire in one place (``text.error_reply``): a domain error becomes memcached's
  line; any other exception becomes ``SERVER_ERROR internal error`` and a logged failure. Nothing a
  client sends can stop the daemon or touch another connection.
- ``stats``, ``version``, ``verbosity`` and ``quit`` are answered here; ``stats`` merges the backend's
  ``stats()`` with this listener's counters (``curr_connections``, ``total_connections``, ...).
- Past ``max_connections`` a new connection gets ``ERROR Too many open connections`` and is closed, as
  memcached does; a connection idle for ``idle_timeout`` seconds is closed (0: never).

Client (``KVClientProtocol``): the gateway's pipelined connection to a kvstore. ``send(command)``
returns a Deferred of the result; replies are matched to requests in order (a deque). A request may
have a timeout (the injected clock's); when it expires the connection is dropped, since the replies
behind it would come late too. The deadlines are checked by one timer per connection, not one per
request: replies come in order, so only the oldest pending request can be the first to expire; the timer
is due at its deadline and, when it fires, moves on to the next oldest (a timer that finds nothing
pending just ends). A lost connection fails every pending request with ``KVConnectionLost``.
``noreply`` is never sent: every request gets its reply, so the pipeline cannot lose step.
``KVClientPool`` keeps a few such connections to one kvstore, reconnecting with backoff.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import replace
from typing import Any, cast

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

import chashd
from chashd.commands import (
    Arith,
    Command,
    Delete,
    FlushAll,
    Get,
    Number,
    Quit,
    Result,
    StatsCommand,
    StatsResult,
    Status,
    Store,
    Touch,
    Values,
    Verbosity,
    VersionCommand,
    XApplied,
    XPut,
)
from chashd.errors import ChashdError, ServiceUnavailable
from chashd.interfaces import IKeyValue
from chashd.memcache.text import (
    DEFAULT_MAX_KEYS,
    DEFAULT_MAX_LINE,
    DEFAULT_MAX_VALUE_SIZE,
    BadReply,
    Rejected,
    ReplyParser,
    RequestParser,
    error_reply,
    plain_get_reply,
    serialize_command,
    serialize_result,
    stats_reply,
    version_reply,
)

__all__ = [
    "KVClientPool",
    "KVClientProtocol",
    "KVConnectionLost",
    "KVTimeout",
    "MemcacheServerFactory",
    "MemcacheServerProtocol",
]

_OK = b"OK\r\n"
_TOO_MANY_CONNECTIONS = b"ERROR Too many open connections\r\n"
_STATS_USAGE = b"CLIENT_ERROR usage: stats detail on|off|dump\r\n"
_LOCAL = frozenset({Rejected, StatsCommand, VersionCommand, Verbosity, Quit})  # not for the backend
_RESULTS = frozenset({Status, Values, Number, StatsResult, XApplied})  # answered at once, not a Deferred
_SILENCEABLE = frozenset({Store, Delete, Arith, Touch, FlushAll, Verbosity, XPut})  # commands with noreply
_FLUSH_AT = 65536  # bytes of replies gathered before they are written (the transport's buffer size)
_PUT_GROUP = 512  # most XPuts run in one transaction by a backend with execute_puts
_CLOSE = object()  # a queue entry: close the connection once everything before it is written


def _nodelay(transport: Any) -> None:
    """Small replies must leave at once: Nagle plus delayed ACKs would hold them for up to 40 ms."""
    set_nodelay = getattr(transport, "setTcpNoDelay", None)
    if set_nodelay is not None:
        with suppress(OSError):  # a UNIX socket has no Nagle
            set_nodelay(True)


# -- server ---------------------------------------------------------------------------------------------


class MemcacheServerFactory(Factory):
    """Builds server connections over ``backend``; holds the listener's limits and counters."""

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
        version: str = chashd.__version__,
    ) -> None:
        self.backend = backend
        self.clock = clock
        self.max_value_size = max_value_size
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.max_line = max_line
        self.max_keys = max_keys
        self.max_pending = max_pending
        self.version = version
        self.started = clock.seconds()
        self.curr_connections = 0
        self.total_connections = 0
        self.rejected_connections = 0
        self.idle_closed = 0

    def buildProtocol(self, addr: IAddress | None) -> MemcacheServerProtocol:
        """A new server connection."""
        return MemcacheServerProtocol(self)

    def stats(self) -> list[tuple[str, str]]:
        """The ``stats`` lines: this listener's counters, then the backend's."""
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
            ("max_connections", str(self.max_connections)),
        ]
        seen = {name for name, _ in items}
        for name, value in self.backend.stats().items():
            if name not in seen:
                items.append((name, str(value)))
        return items

    def settings(self) -> list[tuple[str, str]]:
        """The ``stats settings`` lines."""
        return [
            ("maxconns", str(self.max_connections)),
            ("item_size_max", str(self.max_value_size)),
            ("idle_timeout", str(int(self.idle_timeout))),
            ("max_line", str(self.max_line)),
            ("max_keys_per_get", str(self.max_keys)),
            ("max_pending_replies", str(self.max_pending)),
            ("backend", self.backend.name),
        ]


@implementer(IPushProducer)
class MemcacheServerProtocol(Protocol):
    """One client connection of the line protocol (see the module docstring).

    It is the transport's producer: when the client does not read its replies and the transport's
    write buffer fills up, the connection stops reading and parsing until the buffer drains, as memcached
    stops at a reply it cannot send; so a client that never reads holds a bounded amount of memory.
    """

    _log = Logger()

    def __init__(self, factory: MemcacheServerFactory) -> None:
        self.factory = factory
        #: Schedules the idle check; tests replace it with a ``Clock``'s.
        self.callLater: Callable[..., IDelayedCall] = factory.clock.callLater
        self._seconds = factory.clock.seconds
        #: The backend's ``get_one`` (the kvstore's): plain gets skip the command and result objects.
        self._get_one: Callable[[bytes], tuple[int, bytes] | None] | None = getattr(factory.backend, "get_one", None)
        self._parser = RequestParser(
            factory.max_value_size, factory.max_line, factory.max_keys, plain_gets=self._get_one is not None
        )
        self._execute = factory.backend.execute
        self._execute_puts: Callable[[list[XPut]], list[Result | ChashdError]] | None = getattr(
            factory.backend, "execute_puts", None
        )
        self._queue: deque[Any] = deque()  # pending replies: [bytes | None] cells and _CLOSE
        self._out: list[bytes] = []  # replies to the current read, written together
        self._out_size = 0
        self._paused = False  # not reading nor parsing, because of one of the two below
        self._queue_full = False  # max_pending replies are pending
        self._writes_blocked = False  # the transport's write buffer is full
        self._closing = False
        self._lost = False
        self._counted = False
        self._idle_call: IDelayedCall | None = None
        self._last_seen = 0.0
        self._tr: Any = None  # the transport, typed loosely: TCP transports pause, resume and abort

    # -- connection ------------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._tr = self.transport
        factory = self.factory
        if factory.curr_connections >= factory.max_connections:
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
        _nodelay(self.transport)
        register = getattr(self._tr, "registerProducer", None)  # every TCP/TLS/UNIX transport has it
        if register is not None:
            register(self, True)  # told to pause when replies pile up unread
        if factory.idle_timeout > 0:
            self._last_seen = self._seconds()
            self._idle_call = self.callLater(factory.idle_timeout, self._idle_check)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._closing = True
        if self._counted:
            self._counted = False
            self.factory.curr_connections -= 1
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        self._queue.clear()

    def _idle_check(self) -> None:
        self._idle_call = None
        if self._closing:
            return
        timeout = self.factory.idle_timeout
        idle = self._seconds() - self._last_seen
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

    # -- requests --------------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._idle_call is not None:
            self._last_seen = self._seconds()
        get_one = self._get_one
        if get_one is not None and not self._queue and not self._paused:
            key = self._parser.plain_get(data)
            if key is not None:  # the read is one plain get: no parsing loop, no reply list
                try:
                    found = get_one(key)
                except Exception:  # the engine failed: the general path words the error and logs it
                    self._handle(Get((key,)))
                    self._flush_out()
                    return
                self._tr.write(plain_get_reply(key, found))
                return
        self._parser.feed(data)
        self._process()

    def _process(self) -> None:
        """Run the parsed commands until the buffer is empty, the queue is full or the connection closes;
        then write every reply they made at once."""
        next_event = self._parser.next
        handle = self._handle
        group_puts = self._execute_puts is not None
        puts: list[XPut] = []
        try:
            while not self._paused and not self._closing:
                event = next_event()
                if event is None:
                    break
                if isinstance(event, bytes):  # a plain get of this key (only with a backend's get_one)
                    if puts:
                        self._run_puts(puts)
                        puts = []
                    self._plain_get(event)
                    continue
                if group_puts and type(event) is XPut:
                    puts.append(event)
                    if len(puts) >= _PUT_GROUP:
                        self._run_puts(puts)
                        puts = []
                    continue
                if puts:
                    self._run_puts(puts)
                    puts = []
                handle(event)
        finally:
            if puts:
                self._run_puts(puts)
            out = self._out
            if out:
                data = out[0] if len(out) == 1 else b"".join(out)
                out.clear()
                self._out_size = 0
                self._tr.write(data)

    def _flush_out(self) -> None:
        out = self._out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            self._out_size = 0
            self._tr.write(data)

    def _plain_get(self, key: bytes) -> None:
        try:
            found = self._get_one(key)  # type: ignore[misc]
        except Exception:  # the engine failed: the general path words the error and logs it
            self._handle(Get((key,)))
            return
        self._reply(plain_get_reply(key, found))

    def _handle(self, command: Command | Rejected) -> None:
        if type(command) in _LOCAL:
            if isinstance(command, Rejected):
                self._rejected(command)
            else:
                self._local(command)  # type: ignore[arg-type]
            return
        command = cast(Command, command)
        try:
            result = self._execute(command)
        except ChashdError as e:
            reply = error_reply(e)
        except Exception:
            self._log.failure("the backend failed on {command}", command=type(command).__name__)
            reply = error_reply(RuntimeError())
        else:
            if type(result) not in _RESULTS and isinstance(result, Deferred):
                self._pending(command, result)
                return
            try:
                reply = serialize_result(command, result)
            except Exception:
                self._log.failure("cannot serialize the result of {command}", command=type(command).__name__)
                reply = error_reply(RuntimeError())
        if type(command) in _SILENCEABLE and command.noreply:  # type: ignore[union-attr]
            return
        if self._queue:
            self._queue.append([reply])
        else:
            self._out.append(reply)
            self._out_size += len(reply)
            if self._out_size >= _FLUSH_AT:
                self._flush_out()  # big replies leave now, so that a full transport can pause us

    def _run_puts(self, puts: list[XPut]) -> None:
        """Run XPuts the backend groups in one transaction and queue their replies in order."""
        if len(puts) == 1:
            self._handle(puts[0])
            return
        assert self._execute_puts is not None
        try:
            results = self._execute_puts(puts)
        except ChashdError as e:  # the transaction failed: none of them is stored
            results = [e] * len(puts)
        except Exception:
            self._log.failure("the backend failed on {count} grouped xput", count=len(puts))
            results = [RuntimeError()] * len(puts)  # type: ignore[list-item]
        for put, result in zip(puts, results):
            if put.noreply:
                continue
            if isinstance(result, BaseException):
                self._reply(error_reply(result))
            else:
                self._reply(serialize_result(put, result))

    def _reply(self, reply: bytes) -> None:
        if self._queue:
            self._queue.append([reply])
        else:
            self._out.append(reply)
            self._out_size += len(reply)
            if self._out_size >= _FLUSH_AT:
                self._flush_out()

    def _rejected(self, rejected: Rejected) -> None:
        if rejected.then is not None:
            self._run_silently(rejected.then)
        if rejected.reply:
            self._reply(error_reply(rejected.error))
        if rejected.close:
            self._close_after_replies()

    def _run_silently(self, command: Command) -> None:
        """Run a command nobody waits for (a failed set's delete); its errors are only logged."""
        try:
            result = self._execute(command)
        except ChashdError:
            return
        except Exception:
            self._log.failure("the backend failed on {command}", command=type(command).__name__)
            return
        if isinstance(result, Deferred):
            result.addErrback(lambda f: None if f.check(ChashdError) else self._log.failure("background write", f))

    def _close_after_replies(self) -> None:
        self._closing = True
        if self._queue:
            self._queue.append(_CLOSE)
        else:
            self._close_now()

    def _local(self, command: StatsCommand | VersionCommand | Verbosity | Quit) -> None:
        """The commands this adapter answers itself."""
        if type(command) is Quit:
            self._close_after_replies()
        elif type(command) is VersionCommand:
            self._reply(version_reply(self.factory.version))
        elif type(command) is Verbosity:
            if not command.noreply:
                self._reply(_OK)
        elif type(command) is StatsCommand:
            self._reply(self._stats(command.group))

    def _stats(self, group: str) -> bytes:
        name, _, argument = group.partition(" ")
        try:
            if name == "":
                return stats_reply(self.factory.stats())
            if name == "settings":
                return stats_reply(self.factory.settings())
        except Exception:
            self._log.failure("stats failed")
            return error_reply(RuntimeError())
        if name == "reset":
            return b"RESET\r\n"  # counters here are cumulative (Prometheus reads them), so nothing resets
        if name == "detail":
            argument = argument.split(" ")[0]
            if argument in ("on", "off"):
                return _OK
            return b"END\r\n" if argument == "dump" else _STATS_USAGE
        if name in ("items", "slabs", "sizes", "conns"):
            return b"END\r\n"
        return b"ERROR\r\n"

    # -- replies that come later (a Deferred backend) ----------------------------------------------------

    def _pending(self, command: Command, result: Deferred[Result]) -> None:
        cell: list[bytes | None] = [None]
        self._queue.append(cell)
        noreply = getattr(command, "noreply", False)

        def done(value: Result) -> None:
            try:
                cell[0] = b"" if noreply else serialize_result(command, value)
            except Exception:
                self._log.failure("cannot serialize the result of {command}", command=type(command).__name__)
                cell[0] = error_reply(RuntimeError())
            self._drain()

        def failed(failure: Failure) -> None:
            if not failure.check(ChashdError):
                self._log.failure("the backend failed on {command}", failure, command=type(command).__name__)
            cell[0] = b"" if noreply else error_reply(failure.value or RuntimeError())
            self._drain()

        result.addCallbacks(done, failed)
        if len(self._queue) >= self.factory.max_pending and not self._queue_full:
            self._queue_full = True
            self._update_reading()

    def _drain(self) -> None:
        """Write the replies at the head of the queue that are done, in order."""
        if self._lost:
            return
        queue = self._queue
        out = self._out
        while queue and (queue[0] is _CLOSE or queue[0][0] is not None):
            entry = queue.popleft()
            if entry is _CLOSE:
                queue.clear()
                self._close_now()
                return
            if entry[0]:
                out.append(entry[0])
                self._out_size += len(entry[0])
                if self._out_size >= _FLUSH_AT:
                    self._flush_out()
        self._flush_out()
        if self._queue_full and len(queue) <= self.factory.max_pending // 2:
            self._queue_full = False
            self._update_reading()

    # -- flow control: stop reading while replies cannot leave -----------------------------------------

    def pauseProducing(self) -> None:
        """The transport's write buffer is full (the client does not read its replies): stop reading."""
        self._writes_blocked = True
        self._update_reading()

    def resumeProducing(self) -> None:
        """The transport's write buffer drained: read and parse again."""
        self._writes_blocked = False
        self._update_reading()

    def stopProducing(self) -> None:
        """The connection is going away."""
        self._closing = True

    def _update_reading(self) -> None:
        paused = self._queue_full or self._writes_blocked
        if paused == self._paused or self._lost:
            return
        self._paused = paused
        if paused:
            self._tr.pauseProducing()
        else:
            self._tr.resumeProducing()
            self._process()  # what was read before the pause


# -- client ---------------------------------------------------------------------------------------------


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


#: A pending request: the command, its Deferred (or its ``send_many`` group), and when it was sent (the
#: clock's seconds; 0 without a timeout).
_Request = tuple[Command, "Deferred[Result] | _Group", float]


class KVClientProtocol(Protocol):
    """A pipelined client connection to a kvstore's line port (see the module docstring).

    ``clock`` and ``timeout``: each request fails with ``KVTimeout`` after ``timeout`` seconds (None:
    never), checked by one timer per connection. ``on_connect``/``on_lost`` tell a pool when the
    connection comes and goes.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime | None = None,
        timeout: float | None = None,
        max_value_size: int = 128 * 1024 * 1024,
        on_connect: Callable[[KVClientProtocol], None] | None = None,
        on_lost: Callable[[KVClientProtocol], None] | None = None,
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
        _nodelay(self.transport)
        if self._on_connect is not None:
            self._on_connect(self)

    def send(self, command: Command) -> Deferred[Result]:
        """Send ``command``; the Deferred fires with its result or fails with a ``chashd.errors`` error."""
        if not self._connected:
            return fail(KVConnectionLost(f"not connected to {self.peer}: {self._lost_reason or 'not yet'}"))
        kind = type(command)
        if kind in _SILENCEABLE:
            if command.noreply:  # type: ignore[union-attr]
                command = replace(cast(Any, command), noreply=False)
        elif kind is Quit:
            raise ValueError("quit is not a request; close the connection instead")
        deferred: Deferred[Result] = Deferred()
        seconds = self._seconds
        if seconds is None:
            self._pending.append((command, deferred, 0.0))
        else:
            self._pending.append((command, deferred, seconds()))
            if self._timer is None:
                assert self._clock is not None and self._timeout is not None
                self._timer = self._clock.callLater(self._timeout, self._check_deadline)
        self._tr.write(serialize_command(command))
        return deferred

    def send_many(self, commands: Sequence[Command]) -> Deferred[list[Result | Failure]]:
        """Send ``commands`` in one write; the Deferred fires once each is answered, with a list of each
        one's result or the ``Failure`` of its error, in order. For bulk senders (a handoff pushes a page
        of XPuts): one Deferred and one write for the group, in place of one Deferred and one write
        each. ``noreply`` is dropped as in ``send``; ``quit`` is refused."""
        if not commands:
            return succeed([])
        if not self._connected:
            error = KVConnectionLost(f"not connected to {self.peer}: {self._lost_reason or 'not yet'}")
            return succeed([Failure(error) for _ in commands])
        requests: list[Command] = []
        for command in commands:
            kind = type(command)
            if kind is Quit:
                raise ValueError("quit is not a request; close the connection instead")
            if kind in _SILENCEABLE and command.noreply:  # type: ignore[union-attr]
                requests.append(replace(cast(Any, command), noreply=False))
            else:
                requests.append(command)
        wire = b"".join([serialize_command(command) for command in requests])
        group = _Group(len(requests))
        seconds = self._seconds
        sent = seconds() if seconds is not None else 0.0
        self._pending.extend([(command, group, sent) for command in requests])
        if seconds is not None and self._timer is None:
            assert self._clock is not None and self._timeout is not None
            self._timer = self._clock.callLater(self._timeout, self._check_deadline)
        self._tr.write(wire)
        return group.done

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
            if isinstance(result, ChashdError):
                deferred.errback(result)
            else:
                deferred.callback(result)
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

    def _fail_all(self, error: ChashdError, first: _Request | None = None) -> None:
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


class _PoolFactory(Factory):
    def __init__(self, pool: KVClientPool) -> None:
        self.pool = pool

    def buildProtocol(self, addr: IAddress | None) -> KVClientProtocol:
        pool = self.pool
        return KVClientProtocol(pool.clock, pool.timeout, pool.max_value_size, pool._connected, pool._lost)


class KVClientPool(MultiService):
    """``size`` persistent connections to one kvstore, each reconnecting with backoff (``ClientService``).

    ``send`` goes over the connected connection with the fewest pending requests; when none is connected
    it waits for the next connection attempt and fails with ``KVConnectionLost`` if that fails.
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
    ) -> None:
        super().__init__()
        self.clock: IReactorTime = reactor
        self.host = host
        self.port = port
        self.timeout = timeout
        self.max_value_size = max_value_size
        self.spill_at = spill_at
        self.connections: list[KVClientProtocol] = []
        if endpoint is None:
            endpoint = HostnameEndpoint(reactor, host, port, timeout=connect_timeout)
        factory = _PoolFactory(self)
        policy = backoffPolicy(initialDelay=0.1, maxDelay=max_backoff, factor=2.0)
        self._services = [ClientService(endpoint, factory, retryPolicy=policy, clock=reactor) for _ in range(size)]
        for service in self._services:
            service.setServiceParent(self)
        self._next = 0

    def _connected(self, protocol: KVClientProtocol) -> None:
        self.connections.append(protocol)
        self._log.debug("connected to {host}:{port}", host=self.host, port=self.port)

    def _lost(self, protocol: KVClientProtocol) -> None:
        if protocol in self.connections:
            self.connections.remove(protocol)

    def send(self, command: Command) -> Deferred[Result]:
        """Send ``command`` over the first usable connection, or the least busy one once that one has
        ``spill_at`` requests pending."""
        best: KVClientProtocol | None = None
        for connection in self.connections:
            if connection._connected:
                pending = len(connection._pending)
                if pending < self.spill_at:
                    return connection.send(command)
                if best is None or pending < len(best._pending):
                    best = connection
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
            if failure.check(ChashdError):
                return failure
            return Failure(KVConnectionLost(f"cannot connect to {self.host}:{self.port}: {failure.getErrorMessage()}"))

        return waiting.addCallback(connected).addErrback(unreachable)  # type: ignore[return-value]

    def send_many(self, commands: Sequence[Command]) -> Deferred[list[Result | Failure]]:
        """``KVClientProtocol.send_many`` over the connected connection with the fewest pending requests
        (waiting for the next connection attempt when none is connected): each command's result or the
        ``Failure`` of its error, in order."""
        best: KVClientProtocol | None = None
        for connection in self.connections:
            if connection._connected and (best is None or len(connection._pending) < len(best._pending)):
                best = connection
        if best is not None:
            return best.send_many(commands)
        if not self.running:
            error = KVConnectionLost(f"the pool to {self.host}:{self.port} is stopped")
            return succeed([Failure(error) for _ in commands])
        service = self._services[self._next % len(self._services)]
        self._next += 1
        waiting: Deferred[Any] = service.whenConnected(failAfterFailures=1)

        def connected(protocol: KVClientProtocol) -> Deferred[list[Result | Failure]]:
            return protocol.send_many(commands)

        def unreachable(failure: Failure) -> list[Result | Failure]:
            error = KVConnectionLost(f"cannot connect to {self.host}:{self.port}: {failure.getErrorMessage()}")
            return [Failure(error) for _ in commands]

        return waiting.addCallbacks(connected, unreachable)  # type: ignore[return-value]
