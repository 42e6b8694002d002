"""What both daemons need from the process around them: listening, exit status, systemd readiness.

- ``ListenService`` listens on an endpoint string; when it cannot, the daemon stops with status 1
  instead of running on without its port.
- ``exit_with_status`` stops the reactor and then ends the process with a status twistd cannot give.
- ``notify_systemd`` sends ``READY=1`` / ``STOPPING=1`` to ``$NOTIFY_SOCKET`` (Twisted has no sd_notify):
  one datagram, ``@`` at the start of the path meaning the abstract namespace.
- ``freeze_startup_objects`` keeps the garbage collector's full collections short.
"""

from __future__ import annotations

import fcntl
import gc
import os
import socket
import sys
from collections.abc import Callable, Mapping
from typing import IO, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorCore
from twisted.logger import Logger
from twisted.python.failure import Failure

from chashd.errors import ConfigError

__all__ = [
    "ListenService",
    "SystemdNotifier",
    "exit_with_status",
    "freeze_startup_objects",
    "lock_data_dir",
    "notify_systemd",
    "shutdown_command",
]

_log = Logger()


def exit_with_status(reactor: IReactorCore, status: int) -> None:
    """Stop the reactor cleanly, then end the process with ``status``."""

    def _exit() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    reactor.addSystemEventTrigger("after", "shutdown", _exit)
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)


def freeze_startup_objects(reactor: IReactorCore, collector: Any = gc) -> None:
    """Once the reactor runs, collect the garbage and hide every object made so far (modules, classes,
    functions, the services) from the cyclic garbage collector (``gc.freeze``).

    A full collection visits every tracked object and stops every thread meanwhile. In a kvstore that
    is ~65,000 objects made at startup, which took 40-75 ms per full collection on this project's
    loaded machine (measured during a handoff, whose allocations start one every few seconds); frozen,
    2-7 ms. Objects made later are collected as before; frozen ones are still freed by reference
    counting, only their cycles are never collected (startup objects live as long as the process).
    ``collector`` is for tests.
    """

    def freeze() -> None:
        collector.collect()
        collector.freeze()
        _log.info("{count} startup objects frozen out of the garbage collector", count=collector.get_freeze_count())

    reactor.callWhenRunning(freeze)


_locks: list[IO[str]] = []


def lock_data_dir(path: str) -> None:
    """Take ``path``'s lock for the life of this process, creating the directory if needed.

    Two daemons on one data directory would corrupt each other's Raft journal or database; the second
    one stops with a ``ConfigError`` naming the holder's pid. The lock (``flock`` on ``path/.lock``) goes
    away with the process, also after ``kill -9``.
    """
    try:
        os.makedirs(path, exist_ok=True)
        handle = open(os.path.join(path, ".lock"), "a+", encoding="ascii")  # noqa: SIM115 - held until exit
    except OSError as e:
        raise ConfigError(f"option --data-dir: cannot use {path}: {e.strerror}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ConfigError(f"option --data-dir: {path} is in use by another chashd process (pid {holder})") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _locks.append(handle)


def notify_systemd(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send one sd_notify datagram (``READY=1``); False when there is no ``$NOTIFY_SOCKET``."""
    environ = os.environ if environ is None else environ
    path = environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:
        _log.warn("cannot notify systemd at {path}: {error}", path=path, error=e)
        return False
    return True


class ListenService(Service):
    """Listen on a Twisted endpoint string while running; stop the daemon if that fails.

    ``listening`` fires with the port once it accepts connections.
    """

    _log = Logger()

    def __init__(self, reactor: IReactorCore, description: str, factory: IProtocolFactory, what: str) -> None:
        self._reactor = reactor
        self.description = description
        self._factory = factory
        self.what = what
        self.port: IListeningPort | None = None
        self.listening: Deferred[IListeningPort] = Deferred()

    def startService(self) -> None:
        super().startService()
        endpoint = serverFromString(self._reactor, self.description)
        endpoint.listen(self._factory).addCallbacks(self._listened, self._failed)

    def _listened(self, port: IListeningPort) -> None:
        self.port = port
        self._log.info("{what} listening on {address}", what=self.what, address=str(port.getHost()))
        self.listening.callback(port)

    def _failed(self, failure: Failure) -> None:
        self._log.critical(
            "cannot listen on {endpoint} for {what}: {error}",
            endpoint=self.description,
            what=self.what,
            error=failure.getErrorMessage(),
        )
        exit_with_status(self._reactor, 1)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class SystemdNotifier(Service):
    """Tells systemd (``$NOTIFY_SOCKET``) ``READY=1`` once every awaited Deferred has fired, and
    ``STOPPING=1`` when the daemon starts stopping (or draining: call ``stopping()``).

    ``wait_for(d)`` adds a condition before start: a listener's ``listening``, the gateway's Raft state.
    Without ``$NOTIFY_SOCKET`` nothing is sent.
    """

    _log = Logger()

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = environ
        self._waits: list[Deferred[Any]] = []
        self._stopping_sent = False
        self.ready: Deferred[None] = Deferred()

    def wait_for(self, condition: Deferred[Any]) -> None:
        """Hold READY=1 until ``condition`` fires."""
        self._waits.append(condition)

    def startService(self) -> None:
        super().startService()
        gatherResults(self._waits, consumeErrors=True).addCallbacks(self._ready, self._never_ready)

    def _ready(self, _: object) -> None:
        notify_systemd("READY=1", self._environ)
        self._log.info("ready")
        self.ready.callback(None)

    def _never_ready(self, failure: Failure) -> None:
        self._log.failure("not ready", failure)

    def stopping(self) -> None:
        """Send STOPPING=1 (once)."""
        if not self._stopping_sent:
            self._stopping_sent = True
            notify_systemd("STOPPING=1", self._environ)

    def stopService(self) -> None:
        self.stopping()
        super().stopService()


def shutdown_command(reactor: Any, enabled: bool) -> Callable[[], object] | None:
    """What the line protocol's ``shutdown`` calls with ``--enable-shutdown``: stop the reactor on its next
    turn, as SIGTERM does (a kvstore drains first); None, so that the command is refused, without it."""
    if not enabled:
        return None
    return lambda: reactor.callLater(0, reactor.stop)
