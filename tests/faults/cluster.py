"""The cluster of a fault-injection run: ``LocalCluster`` with each daemon on an address of its own.

Gateways listen on 127.0.0.11-13 and kvstores on 127.0.0.21-25 (``kvstore-A`` to ``kvstore-E``), inside
the run's network namespace, each process with the group id ``netns.group_of`` gives its address (the
firewall tells connections apart by it). Everything here blocks (the runner is plain threads).
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chashd.commands import Values, XAuth, XGet
from chashd.launcher import Daemon, LocalCluster
from chashd.launcher import wait_for as poll_until
from chashd.memcache.text import ReplyParser, serialize_command
from chashd.record import Record
from chashd.ring import HashRing
from tests.faults.netns import Member, group_of

__all__ = [
    "GATEWAY_ADDRESSES",
    "KVSTORE_ADDRESSES",
    "FaultCluster",
    "RingView",
    "poll_until",
    "read_records",
]

GATEWAY_ADDRESSES = ("127.0.0.11", "127.0.0.12", "127.0.0.13")
KVSTORE_ADDRESSES = ("127.0.0.21", "127.0.0.22", "127.0.0.23", "127.0.0.24", "127.0.0.25")
KVSTORE_NAMES = tuple(f"kvstore-{letter}" for letter in "ABCDE")

_XGET_BATCH = 200


def _get_json(url: str, timeout: float = 2.0) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise OSError(f"{url} answered {e.code}") from None


def read_records(
    host: str, port: int, keys: Sequence[str], timeout: float = 10.0, token: str | None = None
) -> dict[str, Record]:
    """Every record (tombstones included) a kvstore holds for ``keys``, read with the versioned ``xget``
    extension over its line port, on a connection that proved the cluster ``token`` first (a kvstore given
    one answers the extension only then). Raises OSError when it cannot be read."""
    found: dict[str, Record] = {}
    with socket.create_connection((host, port), timeout=timeout) as s:
        if token is not None:
            s.sendall(serialize_command(XAuth(token.encode())))
            answer = s.recv(1 << 10)
            if answer != b"OK\r\n":
                raise OSError(f"{host}:{port} refused the cluster token: {answer[:100]!r}")
        for start in range(0, len(keys), _XGET_BATCH):
            command = XGet(tuple(k.encode() for k in keys[start : start + _XGET_BATCH]))
            s.sendall(serialize_command(command))
            parser = ReplyParser()
            while True:
                result = parser.next(command)
                if result is not None:
                    break
                data = s.recv(1 << 16)
                if not data:
                    raise OSError(f"{host}:{port} closed the connection during an xget")
                parser.feed(data)
            if not isinstance(result, Values):
                raise OSError(f"{host}:{port} answered an xget with {result!r}")
            for key, record in result.items:
                found[key.decode()] = record
    return found


@dataclass(frozen=True)
class RingView:
    """The ring a gateway serves (``GET /ring``) and its N."""

    ring: HashRing
    replicas: int

    def preference(self, key: str) -> tuple[str, ...]:
        """The nodes that hold ``key``'s replicas, primary first."""
        return self.ring.preference_list(key.encode(), self.replicas)


class FaultCluster(LocalCluster):
    """Gateways on 127.0.0.11-13, kvstores on 127.0.0.21-25 with the SQLite engine, every process with
    the group id of its address."""

    def __init__(
        self,
        workdir: Path,
        gateways: int = 3,
        kvstores: int = 4,
        gateway_args: Sequence[str] = (),
        kvstore_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        if gateways > len(GATEWAY_ADDRESSES) or kvstores > len(KVSTORE_ADDRESSES):
            raise ValueError("a fault-injection cluster has at most 3 gateways and 5 kvstores")
        super().__init__(
            workdir,
            gateways=gateways,
            kvstores=kvstores,
            engine="sqlite",
            gateway_args=gateway_args,
            kvstore_args=kvstore_args,
            env=env,
        )

    def host_of(self, name: str) -> str:
        if name in KVSTORE_NAMES:
            return KVSTORE_ADDRESSES[KVSTORE_NAMES.index(name)]
        if name.startswith("gateway-"):
            return GATEWAY_ADDRESSES[int(name.rpartition("-")[2]) - 1]
        raise ValueError(f"no address for {name!r}")

    def make_daemon(self, role: str, name: str, args: Sequence[str], http_port: int) -> Daemon:
        host = self.host_of(name)
        log = self.workdir / f"{name}.log"
        return Daemon(role, name, args, http_port, log, env=self.env, host=host, group=group_of(host))

    # -- who is who ---------------------------------------------------------------------------------

    @staticmethod
    def all_members(gateways: int = 3) -> list[Member]:
        """Every daemon a run may start, as the firewall sees them."""
        names = [f"gateway-{i + 1}" for i in range(gateways)]
        return [Member(n, a) for n, a in zip(names, GATEWAY_ADDRESSES)] + [
            Member(n, a) for n, a in zip(KVSTORE_NAMES, KVSTORE_ADDRESSES)
        ]

    def member(self, daemon: Daemon) -> Member:
        """``daemon`` as the firewall sees it."""
        return Member(daemon.name, daemon.host)

    def daemon(self, name: str) -> Daemon:
        """The daemon called ``name``."""
        for daemon in self.gateways + self.kvstores:
            if daemon.name == name:
                return daemon
        raise KeyError(name)

    def spare_kvstore(self) -> str | None:
        """The name of a kvstore slot never started, or None."""
        started = {k.name for k in self.kvstores}
        return next((n for n in KVSTORE_NAMES if n not in started), None)

    def line_address(self, daemon: Daemon) -> tuple[str, int]:
        """Where ``daemon`` serves the memcached protocol."""
        return daemon.host, self.line_ports[daemon.name]

    def running_kvstores(self) -> list[Daemon]:
        """The kvstores whose process runs (paused ones included)."""
        return [k for k in self.kvstores if k.running()]

    # -- what the gateways say ----------------------------------------------------------------------

    def gateway_status(self, gateway: Daemon, timeout: float = 2.0) -> dict[str, Any] | None:
        """``GET /ring/status`` of ``gateway``, None when it does not answer."""
        try:
            body = _get_json(gateway.url + "/ring/status", timeout)
        except (OSError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    def leader(self, timeout: float = 2.0) -> Daemon | None:
        """The gateway a majority of the gateways name as leader (and that itself says it leads)."""
        named: dict[str, int] = {}
        for gateway in self.gateways:
            if gateway.running():
                status = self.gateway_status(gateway, timeout)
                if status and status.get("leader"):
                    named[status["leader"]] = named.get(status["leader"], 0) + 1
        for name, votes in named.items():
            if votes * 2 > len(self.gateways):
                try:
                    return self.daemon(name)
                except KeyError:
                    return None
        return None

    def ring_view(self, timeout: float = 2.0) -> RingView:
        """The ring of the first gateway that answers ``GET /ring``; OSError when none does."""
        for gateway in self.gateways:
            if not gateway.running():
                continue
            try:
                body = _get_json(gateway.url + "/ring", timeout)
            except (OSError, ValueError):
                continue
            return RingView(HashRing.from_dict(body), max(1, min(int(body.get("replicas", 1)), len(body["nodes"]))))
        raise OSError("no gateway answers GET /ring")

    def ring_nodes(self, gateway: Daemon) -> dict[str, str] | None:
        """The nodes of ``gateway``'s map and their states, None when it does not answer."""
        status = self.gateway_status(gateway)
        if status is None:
            return None
        return {n["id"]: n["state"] for n in status.get("nodes", [])}

    def unsettled(self) -> str | None:
        """What keeps the cluster from being settled, or None when it is: every gateway runs and names
        the same leader at the same epoch, every running kvstore (and only they) is up in every gateway's
        map, no rebalancing is under way, and every kvstore's handoff is synced with the newest ring."""
        statuses = {}
        for gateway in self.gateways:
            if not gateway.running():
                return f"{gateway.name} is not running"
            status = self.gateway_status(gateway)
            if status is None:
                return f"{gateway.name} does not answer /ring/status"
            statuses[gateway.name] = status
        leaders = {s.get("leader") for s in statuses.values()}
        if len(leaders) != 1 or None in leaders:
            return f"the gateways name leaders {sorted(map(str, leaders))}"
        epochs = {s.get("epoch") for s in statuses.values()}
        if len(epochs) != 1:
            return f"the gateways are at epochs {sorted(map(str, epochs))}"
        wanted = {k.name for k in self.running_kvstores()}
        for name, status in statuses.items():
            nodes = {n["id"]: n["state"] for n in status.get("nodes", [])}
            if set(nodes) != wanted or set(nodes.values()) != {"up"}:
                return f"{name} has nodes {nodes}, the running kvstores are {sorted(wanted)}"
            if status.get("rebalancing"):
                return f"{name} says rebalancing is under way"
        epoch = epochs.pop()
        for kvstore in self.running_kvstores():
            health = kvstore.health()
            if health is None:
                return f"{kvstore.name} does not answer /health"
            handoff = health.get("handoff") or {}
            if handoff.get("running") or handoff.get("synced_epoch") not in (epoch, handoff.get("target_epoch")):
                return f"{kvstore.name}'s handoff is not done: {handoff}"
        return None

    def settle(self, timeout: float) -> str | None:
        """Wait until ``unsettled()`` is None twice in a row; None when it happened within ``timeout``
        seconds, else the last reason it was not."""
        deadline = time.monotonic() + timeout
        reason: str | None = "not checked"
        calm = 0
        while time.monotonic() < deadline:
            reason = self.unsettled()
            calm = calm + 1 if reason is None else 0
            if calm >= 2:
                return None
            time.sleep(0.5)
        return reason

    # -- what the kvstores hold ---------------------------------------------------------------------

    def kvstore_figures(self) -> dict[str, dict[str, float]]:
        """Each running kvstore's anti-entropy counters (``antientropy_*`` of its ``/stats``) and the CPU
        seconds its process has used (``/proc``), since it last started; one that does not answer is left out."""
        figures: dict[str, dict[str, float]] = {}
        for kvstore in self.running_kvstores():
            try:
                stats = _get_json(kvstore.url + "/stats")
                fields = Path(f"/proc/{kvstore.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, ValueError):
                continue
            own = {k: float(v) for k, v in stats.items() if k.startswith("antientropy_") and isinstance(v, int | float)}
            own["process_cpu_seconds"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            figures[kvstore.name] = own
        return figures

    def records(self, keys: Iterable[str], timeout: float = 10.0) -> dict[str, dict[str, Record]]:
        """Each running kvstore's records of ``keys`` (kvstore name -> key -> record); a kvstore that
        cannot be read is left out."""
        wanted = sorted(set(keys))
        found: dict[str, dict[str, Record]] = {}
        for kvstore in self.running_kvstores():
            try:
                found[kvstore.name] = read_records(*self.line_address(kvstore), wanted, timeout, self.token)
            except OSError:
                continue
        return found
