"""The clients of a fault-injection run: threads that talk memcached to the gateways and record every
operation (pymemcache, one connection per client).

Keys: ``r<i>`` registers (set, add, delete, get; every value written is unique in the run, ``<client>-<n>``),
``c<i>`` counters (set to 0 once before the run, then incr by 1 and get), ``f<client>-<n>`` fresh keys
(each set once). Writers draw operations from ``Workload.mix``; readers only get registers and counters.
A client stays with its gateway until a connection fails, then moves to the next one (as a client with a
server list would).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pymemcache.client.base import Client
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheIllegalInputError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownCommandError,
)

from tests.faults.history import FAIL, INFO, OK, Op, Recorder

__all__ = [
    "DEFAULT_MIX",
    "Endpoint",
    "Session",
    "Worker",
    "Workload",
    "counter_keys",
    "parse_mix",
    "register_keys",
    "set_up_counters",
]

#: The writers' default mix of operations (weights).
DEFAULT_MIX: Mapping[str, float] = {
    "set": 0.35,
    "fresh": 0.15,
    "add": 0.1,
    "delete": 0.1,
    "incr": 0.1,
    "get": 0.2,
}


def parse_mix(text: str) -> dict[str, float]:
    """``set=45,fresh=15,...`` as weights; ``ValueError`` for an unknown operation or a bad weight."""
    mix: dict[str, float] = {}
    for item in text.split(","):
        name, _, weight = item.partition("=")
        if name not in DEFAULT_MIX:
            raise ValueError(f"unknown operation {name!r} in the mix; choose among {', '.join(DEFAULT_MIX)}")
        mix[name] = float(weight)
        if mix[name] < 0:
            raise ValueError(f"negative weight for {name}")
    if not sum(mix.values()):
        raise ValueError("the mix has no operation with a weight")
    return mix


@dataclass(frozen=True)
class Endpoint:
    """A gateway's memcached port."""

    name: str
    host: str
    port: int


@dataclass(frozen=True)
class Workload:
    """What the clients do: how many of each key, how many clients, the writers' mix, the timeout of an
    operation (longer than the gateway's request timeout, so that a gateway's own error comes first)."""

    registers: int = 200
    counters: int = 10
    writers: int = 4
    readers: int = 2
    mix: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    timeout: float = 8.0
    pause: float = 0.01


def register_keys(workload: Workload) -> list[str]:
    """The register keys."""
    return [f"r{i}" for i in range(workload.registers)]


def counter_keys(workload: Workload) -> list[str]:
    """The counter keys."""
    return [f"c{i}" for i in range(workload.counters)]


def _classify(error: BaseException) -> str:
    """The outcome of an operation that raised ``error``: ``fail`` when the server answered with an error
    (or refused the connection, so nothing was sent), ``info`` when the answer may have been lost."""
    if isinstance(error, (MemcacheServerError, MemcacheClientError, MemcacheUnknownCommandError)):
        return FAIL
    if isinstance(error, (MemcacheIllegalInputError, ConnectionRefusedError)):
        return FAIL
    return INFO


class Session:
    """One client's connection to the gateways: runs an operation, records it, moves to the next gateway
    when a connection fails."""

    def __init__(
        self, name: str, endpoints: Sequence[Endpoint], recorder: Recorder, timeout: float, first: int = 0
    ) -> None:
        self.name = name
        self._endpoints = list(endpoints)
        self._recorder = recorder
        self._timeout = timeout
        self._current = first % len(self._endpoints)
        self._client: Client | None = None

    @property
    def endpoint(self) -> Endpoint:
        """The gateway this session talks to now."""
        return self._endpoints[self._current]

    def _connection(self) -> Client:
        if self._client is None:
            e = self.endpoint
            self._client = Client(
                (e.host, e.port), connect_timeout=min(2.0, self._timeout), timeout=self._timeout, default_noreply=False
            )
        return self._client

    def close(self) -> None:
        """Close the connection."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def _next_gateway(self) -> None:
        self.close()
        self._current = (self._current + 1) % len(self._endpoints)

    def run(self, kind: str, key: str, value: str | None = None) -> Op:
        """Run one operation and record it."""
        gateway = self.endpoint.name
        invoke = self._recorder.now()
        try:
            result = self._call(kind, key, value)
        except (TimeoutError, OSError, MemcacheUnexpectedCloseError, MemcacheIllegalInputError) as e:
            self._next_gateway()
            return self._recorder.record(
                self.name, gateway, kind, key, value, invoke, _classify(e), error=f"{type(e).__name__}: {e}"
            )
        except (MemcacheServerError, MemcacheClientError, MemcacheUnknownCommandError) as e:
            return self._recorder.record(
                self.name, gateway, kind, key, value, invoke, FAIL, error=f"{type(e).__name__}: {e}"
            )
        return self._recorder.record(self.name, gateway, kind, key, value, invoke, OK, result)

    def _call(self, kind: str, key: str, value: str | None) -> str | None:
        client = self._connection()
        if kind == "get":
            got = client.get(key)
            return None if got is None else bytes(got).decode()
        if kind == "set":
            assert value is not None
            return "STORED" if client.set(key, value.encode(), noreply=False) else "NOT_STORED"
        if kind == "add":
            assert value is not None
            return "STORED" if client.add(key, value.encode(), noreply=False) else "NOT_STORED"
        if kind == "delete":
            return "DELETED" if client.delete(key, noreply=False) else "NOT_FOUND"
        if kind == "incr":
            number = client.incr(key, int(value or 1), noreply=False)
            return "NOT_FOUND" if number is None else str(number)
        raise ValueError(f"unknown operation {kind!r}")


class Worker(threading.Thread):
    """A client thread: a writer draws from the workload's mix, a reader only reads; both run until
    ``stop`` is set. Its choices come from ``random.Random(seed)``."""

    def __init__(
        self,
        name: str,
        writer: bool,
        session: Session,
        workload: Workload,
        seed: int,
        stop: threading.Event,
    ) -> None:
        super().__init__(name=f"faults-{name}", daemon=True)
        self.session = session
        self.writer = writer
        self.workload = workload
        self._rng = random.Random(seed)
        self._halt = stop
        self._registers = register_keys(workload)
        self._counters = counter_keys(workload)
        self._kinds = list(workload.mix)
        self._weights = [workload.mix[k] for k in self._kinds]
        self._written = 0

    def _value(self) -> str:
        self._written += 1
        return f"{self.session.name}-{self._written}"

    def next_operation(self) -> tuple[str, str, str | None]:
        """The next operation: (kind, key, value)."""
        rng = self._rng
        if not self.writer:
            keys = self._counters if self._counters and rng.random() < 0.2 else self._registers
            return "get", rng.choice(keys), None
        kind = rng.choices(self._kinds, self._weights)[0]
        if kind == "fresh":
            self._written += 1
            return "set", f"f{self.session.name}-{self._written}", f"{self.session.name}-{self._written}"
        if kind == "incr":
            return (
                ("incr", rng.choice(self._counters), "1")
                if self._counters
                else ("get", rng.choice(self._registers), None)
            )
        if kind == "get":
            keys = self._counters if self._counters and rng.random() < 0.2 else self._registers
            return "get", rng.choice(keys), None
        key = rng.choice(self._registers)
        return kind, key, self._value() if kind in ("set", "add") else None

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                op = self.session.run(*self.next_operation())
                pause = self.workload.pause if op.outcome == OK else max(self.workload.pause, 0.1)
                self._halt.wait(pause)
        finally:
            self.session.close()


def set_up_counters(session: Session, keys: Iterable[str], timeout: float = 60.0) -> None:
    """Set every counter to 0 (retried until acknowledged, at most ``timeout`` seconds in all)."""
    import time

    deadline = time.monotonic() + timeout
    for key in keys:
        while session.run("set", key, "0").result != "STORED":
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not set the counter {key} within {timeout:g}s")
            time.sleep(0.2)
