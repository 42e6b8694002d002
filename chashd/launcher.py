# -*- test-case-name: tests.integration.test_daemons,tests.integration.test_cluster -*-
"""Start and stop real chashd daemons on this machine: ``chash cluster up``, the demo and the tests.

Blocking code for scripts (subprocess and urllib), never imported by the daemons themselves. Every
process started here is tracked by its pid and stopped by it: SIGTERM first, SIGKILL after a timeout.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chashd.node import NodeState

__all__ = [
    "LOWEST_FREE_PORT",
    "ClusterSecrets",
    "Daemon",
    "DaemonError",
    "LocalCluster",
    "RESERVED_FOR",
    "SEED_VARIABLES",
    "clean_environ",
    "default_ledger",
    "ephemeral_ports",
    "free_ports",
    "twistd_command",
    "wait_for",
]


#: The seed deployment's variables, which the daemons read too: a test's or benchmark's daemons must not.
SEED_VARIABLES = ("GATEWAY_ID", "LISTEN_PORT", "RAFT_PORT", "PEER_GATEWAYS", "NODE_ID", "GATEWAY_ADDRESS")


def clean_environ(**extra: str) -> dict[str, str]:
    """This environment without any chashd setting of the machine (``CHASHD_*``, the seed's variables,
    systemd's ``NOTIFY_SOCKET``), plus ``extra``: what a test's or a benchmark's daemons run with."""
    env = {k: v for k, v in os.environ.items() if k not in SEED_VARIABLES and not k.startswith("CHASHD_")}
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra)
    return env


class DaemonError(Exception):
    """A daemon did not start, answer or stop as expected. The message quotes the end of its log."""


#: The lowest port ``free_ports`` hands out.
LOWEST_FREE_PORT = 10000


def ephemeral_ports() -> tuple[int, int]:
    """The range the kernel takes the local ports of outgoing connections from (Linux's default when the
    kernel does not say)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(word) for word in f.read().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def free_ports(count: int, host: str = "127.0.0.1", ledger: Path | None = None) -> list[int]:
    """``count`` distinct TCP ports that were free on ``host`` a moment ago.

    They are drawn at random below the kernel's ephemeral range: a port the kernel hands out (a bind to port
    0) is one that any outgoing connection of the machine may take before the daemon listens on it, which
    happens on a busy machine. Nor are they ports handed out in the last ``RESERVED_FOR`` seconds by another
    call, of this process or another one of the same user (test suites running side by side, each in two
    pytest processes): those are written in ``ledger`` (``default_ledger()``; ``None`` there: not shared),
    since a daemon listens on its ports only seconds after they were chosen.
    """
    low = ephemeral_ports()[0]
    if low - LOWEST_FREE_PORT < 4 * count:  # no room below it: let the kernel choose
        return _kernel_ports(count, host)
    with _PortLedger(ledger or default_ledger()) as reserved:
        unreserved = [p for p in range(LOWEST_FREE_PORT, low) if p not in reserved.ports]
        candidates = random.SystemRandom().sample(unreserved, min(len(unreserved), 100 * count))
        ports = _bindable(candidates, count, host)
        if len(ports) < count:
            raise OSError(f"no {count} free ports on {host} below {low}")
        reserved.add(ports)
        return ports


#: How long a port ``free_ports`` handed out stays out of its later answers (seconds).
RESERVED_FOR = 120.0


def default_ledger() -> Path | None:
    """The file where this user's ``free_ports`` calls note the ports they handed out."""
    getuid = getattr(os, "getuid", None)
    return Path(tempfile.gettempdir(), f"chashd-free-ports-{getuid()}") if getuid else None


class _PortLedger:
    """The ports handed out in the last ``RESERVED_FOR`` seconds, as lines ``<port> <time>`` in a file only
    its owner may write, locked (``flock``) from reading to writing. Without a usable file, none."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.fd: int | None = None
        self.ports: dict[int, float] = {}

    def __enter__(self) -> _PortLedger:
        if self.path is None:
            return self
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            with os.fdopen(os.dup(self.fd), "r") as f:
                text = f.read()
        except OSError:  # another user's file, a read-only /tmp: not shared
            self._close()
            return self
        since = time.time() - RESERVED_FOR
        for line in text.splitlines():
            words = line.split()
            try:
                port, at = int(words[0]), float(words[1])
            except (IndexError, ValueError):
                continue
            if at >= since:
                self.ports[port] = at
        return self

    def add(self, ports: Sequence[int]) -> None:
        """Note ``ports`` as handed out now."""
        now = time.time()
        self.ports.update((p, now) for p in ports)
        if self.fd is None:
            return
        text = "".join(f"{p} {at:.3f}\n" for p, at in self.ports.items()).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text, 0)

    def __exit__(self, *_: object) -> None:
        self._close()

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # also lets go of the lock
            self.fd = None


def _bindable(candidates: Sequence[int], count: int, host: str) -> list[int]:
    """The first ``count`` of ``candidates`` that ``host`` lets us bind (fewer when too few are)."""
    sockets: list[socket.socket] = []
    try:
        for port in candidates:
            if len(sockets) == count:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((host, port))
            except OSError:  # taken (or in TIME_WAIT): another one
                s.close()
                continue
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _kernel_ports(count: int, host: str) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class ClusterSecrets:
    """A cluster's two secrets: the gateways' Raft password and the cluster token (see SECURITY.md).

    ``generate()`` makes random ones (never fixed values: each cluster, each test its own); ``write(directory)``
    puts them in files only their owner can read, which the daemons read with ``--raft-password-file`` and
    ``--token-file`` (a command line is visible to every local user, a file is not).
    """

    raft_password: str
    token: str

    @classmethod
    def generate(cls) -> ClusterSecrets:
        """Random secrets (32 random bytes each, hex)."""
        return cls(secrets.token_hex(32), secrets.token_hex(32))

    def write(self, directory: Path) -> dict[str, Path]:
        """Write ``raft-password`` and ``token`` into ``directory`` (mode 0700, files 0600); their paths."""
        directory = Path(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
        paths = {}
        for name, value in (("raft-password", self.raft_password), ("token", self.token)):
            path = directory / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(value + "\n")
            path.chmod(0o600)
            paths[name] = path
        return paths

    def environ(self) -> dict[str, str]:
        """The secrets as the daemons' environment variables."""
        return {"CHASHD_RAFT_PASSWORD": self.raft_password, "CHASHD_TOKEN": self.token}


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Call ``check`` until it returns something truthy (an OSError or ValueError counts as not yet) and
    return that; ``TimeoutError`` naming ``what`` and the last answer after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except (OSError, ValueError) as e:
            last = e
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def twistd_command(role: str, args: Sequence[str], twistd_options: Sequence[str] = ()) -> list[str]:
    """The command line that runs ``role`` (``chash-gateway``/``chash-kvstore``) in the foreground;
    ``twistd_options`` go to twistd itself (``--logger=chashd.logs.json_stdout``)."""
    twistd = Path(sys.executable).with_name("twistd")
    prefix = (
        [str(twistd)] if twistd.exists() else [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    )
    return [*prefix, "--nodaemon", "--pidfile=", *twistd_options, role, *args]


def http_json(
    url: str, timeout: float = 2.0, method: str = "GET", body: Any = None, token: str | None = None
) -> tuple[int, Any]:
    """A blocking JSON request (with ``Authorization: Bearer <token>`` when given): ``(status, parsed body
    or None)``; raises OSError when unreachable."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as e:
        raw = e.read()
        status = e.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, None


class Daemon:
    """One twistd process of a role, with its log in ``log_path``."""

    def __init__(
        self,
        role: str,
        name: str,
        args: Sequence[str],
        http_port: int,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        twistd_options: Sequence[str] = (),
        group: int | None = None,
    ) -> None:
        self.role = role
        #: The group id the process runs with (None: this process's); a fault-injection run tells the
        #: daemons' connections apart by it.
        self.group = group
        self.twistd_options = list(twistd_options)
        self.name = name
        self.args = list(args)
        self.http_port = http_port
        self.host = host
        self.log_path = Path(log_path)
        self.env = dict(os.environ if env is None else env)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The base URL of the HTTP API."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def pid(self) -> int | None:
        """The process id while it runs."""
        return self.process.pid if self.process else None

    def start(self) -> Daemon:
        """Start the process (its output goes to ``log_path``)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                twistd_command(self.role, self.args, self.twistd_options),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
                group=self.group,
            )
        return self

    def running(self) -> bool:
        """True while the process has not exited."""
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def health(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """``GET /health`` or None when it does not answer 200."""
        try:
            status, body = http_json(self.url + "/health", timeout=timeout)
        except (OSError, ValueError):
            return None
        return body if status == 200 and isinstance(body, dict) else None

    def wait_healthy(self, timeout: float = 20.0) -> dict[str, Any]:
        """Wait until ``/health`` answers; raises ``DaemonError`` if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise DaemonError(f"{self.name} exited with status {self.returncode()}:\n{self.log_tail()}")
            body = self.health(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
            if body is not None:
                return body
            time.sleep(0.05)
        raise DaemonError(f"{self.name} did not answer /health within {timeout:g}s:\n{self.log_tail()}")

    def returncode(self) -> int | None:
        """The exit status, negative for a signal, None while running."""
        return self.process.poll() if self.process else None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process (and only to it, by its pid)."""
        if self.running():
            assert self.process is not None
            self.process.send_signal(signum)

    def wait(self, timeout: float) -> int | None:
        """Wait for the exit; the status, or None if still running after ``timeout``."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited after ``timeout``; returns the exit status."""
        if self.process is None:
            return None
        if self.running():
            self.signal(signal.SIGTERM)
            self.signal(signal.SIGCONT)  # a paused process would not see the SIGTERM
            if self.wait(timeout) is None:
                self.kill()
        return self.process.wait()

    def kill(self) -> None:
        """SIGKILL, and reap."""
        if self.process is not None and self.running():
            self.process.kill()
            self.process.wait()


class LocalCluster:
    """Gateways and kvstores as real twistd processes on free loopback ports, for scripts and tests.

    ``start()`` waits until a Raft leader is known and every kvstore is up in the ring. Every process
    is stopped by ``stop()`` (also usable as a context manager). Logs and data live under ``workdir``.
    The cluster's secrets (``secrets``: random unless given) are written to ``workdir/secrets`` and read from
    there by every daemon; ``token`` is what admin requests (drain, remove) and internal clients need.
    Every daemon listens on ``host``; a subclass may place each on an address of its own (``host_of``)
    and give its processes more (``make_daemon``).
    """

    def __init__(
        self,
        workdir: Path,
        gateways: int = 3,
        kvstores: int = 3,
        engine: str = "memory",
        gateway_args: Sequence[str] = (),
        kvstore_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        secrets: ClusterSecrets | None = None,
    ) -> None:
        if gateways < 1:
            raise ValueError("a cluster needs at least one gateway")
        self.workdir = Path(workdir)
        self.secrets = secrets or ClusterSecrets.generate()
        self._secret_files: dict[str, Path] = {}
        self.engine = engine
        self.host = host
        self.env = dict(os.environ if env is None else env)
        self.gateway_args = list(gateway_args)
        self.kvstore_args = list(kvstore_args)
        self.gateways: list[Daemon] = []
        self.kvstores: list[Daemon] = []
        self.followers: list[Daemon] = []
        self.line_ports: dict[str, int] = {}
        self.raft_ports: dict[str, int] = {}
        self._gateway_count = gateways
        self._kvstore_count = kvstores
        self._next_kvstore = 0

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def token(self) -> str:
        """The cluster token (for admin requests: ``Authorization: Bearer <token>``)."""
        return self.secrets.token

    @property
    def secrets_dir(self) -> Path:
        """Where the secrets' files are."""
        return self.workdir / "secrets"

    def _secret_args(self, *names: str) -> list[str]:
        if not self._secret_files:
            self._secret_files = self.secrets.write(self.secrets_dir)
        return [arg for name in names for arg in (f"--{name}-file", str(self._secret_files[name]))]

    @property
    def gateway_urls(self) -> list[str]:
        """The HTTP base URLs of the gateways."""
        return [g.url for g in self.gateways]

    def host_of(self, name: str) -> str:
        """The address the daemon ``name`` listens on and advertises: ``host`` unless a subclass says."""
        return self.host

    def make_daemon(self, role: str, name: str, args: Sequence[str], http_port: int) -> Daemon:
        """The ``Daemon`` (not started) of one process, logging to ``workdir/<name>.log``."""
        log = self.workdir / f"{name}.log"
        return Daemon(role, name, args, http_port, log, env=self.env, host=self.host_of(name))

    def _gateway_name(self, index: int) -> str:
        return f"gateway-{index + 1}"

    def _gateway(self, index: int, http: int, raft: int, line: int, peers: list[str]) -> Daemon:
        name = self._gateway_name(index)
        host = self.host_of(name)
        args = [
            "--gateway-id", name,
            "--port", f"tcp:{http}:interface={host}",
            "--line-port", f"tcp:{line}:interface={host}",
            "--raft-port", str(raft),
            "--advertise-host", host,
            "--peers", ",".join(peers),
            "--data-dir", str(self.workdir / name),
            *self._secret_args("raft-password", "token"),
            *self.gateway_args,
        ]  # fmt: skip
        self.line_ports[name] = line
        self.raft_ports[name] = raft
        return self.make_daemon("chash-gateway", name, args, http)

    def start(self, timeout: float = 60.0) -> LocalCluster:
        """Start every process and wait until the ring is ready; on failure stop what started and raise."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            hosts = [self.host_of(self._gateway_name(i)) for i in range(self._gateway_count)]
            free = {host: iter(free_ports(3 * hosts.count(host), host)) for host in hosts}
            ports = [(next(free[host]), next(free[host]), next(free[host])) for host in hosts]
            raft_addresses = [f"{host}:{raft}" for host, (_, raft, _) in zip(hosts, ports)]
            for i, (http, raft, line) in enumerate(ports):
                self.gateways.append(self._gateway(i, http, raft, line, raft_addresses).start())
            for gateway in self.gateways:
                gateway.wait_healthy(timeout)
            self.wait_for_leader(timeout)
            for _ in range(self._kvstore_count):
                self.add_kvstore(wait=False)
            self.wait_for_nodes(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def add_kvstore(
        self, name: str | None = None, wait: bool = True, timeout: float = 60.0, gateways: Sequence[str] = ()
    ) -> Daemon:
        """Start one more kvstore registered with every gateway (or with ``gateways``, URLs in the order
        it tries them)."""
        self._next_kvstore += 1
        if name is None:
            n = self._next_kvstore
            name = f"kvstore-{chr(ord('A') + n - 1)}" if n <= 26 else f"kvstore-{n}"
        host = self.host_of(name)
        http, line = free_ports(2, host)
        args = [
            "--node-id", name,
            "--port", f"tcp:{http}:interface={host}",
            "--line-port", f"tcp:{line}:interface={host}",
            "--advertise-host", host,
            "--gateway", ",".join(gateways or self.gateway_urls),
            *self._secret_args("token"),
            *self.kvstore_args,
        ]  # fmt: skip
        if self.engine == "sqlite":
            args += ["--data-dir", str(self.workdir / name)]
        else:
            args += ["--engine", "memory"]
        daemon = self.make_daemon("chash-kvstore", name, args, http)
        self.line_ports[name] = line
        self.kvstores.append(daemon.start())
        if wait:
            daemon.wait_healthy(timeout)
            self.wait_for_nodes(timeout)
        return daemon

    def add_follower(self, args: Sequence[str] = (), wait: bool = True, timeout: float = 60.0) -> Daemon:
        """Start a gateway without Raft that follows the cluster's gateways (``--follow``) and serves keys."""
        name = f"follower-{len(self.followers) + 1}"
        http, line = free_ports(2, self.host)
        daemon_args = [
            "--gateway-id", name,
            "--port", f"tcp:{http}:interface={self.host}",
            "--line-port", f"tcp:{line}:interface={self.host}",
            "--follow", ",".join(self.gateway_urls),
            *self._secret_args("token"),
            *args,
        ]  # fmt: skip
        daemon = Daemon(
            "chash-gateway", name, daemon_args, http, self.workdir / f"{name}.log", env=self.env, host=self.host
        )
        self.line_ports[name] = line
        self.followers.append(daemon.start())
        if wait:
            daemon.wait_healthy(timeout)
        return daemon

    def status(self, gateway: int = 0, timeout: float = 2.0) -> dict[str, Any]:
        """``GET /ring/status`` of one gateway."""
        status, body = http_json(self.gateways[gateway].url + "/ring/status", timeout=timeout)
        if status != 200 or not isinstance(body, dict):
            raise DaemonError(f"{self.gateways[gateway].name} answered /ring/status with {status}")
        return body

    def _poll(self, what: str, check: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        last_error = ""
        while time.monotonic() < deadline:
            for daemon in self.gateways + self.kvstores:
                if daemon.process is not None and not daemon.running() and daemon.returncode() not in (0, -15):
                    raise DaemonError(f"{daemon.name} exited with {daemon.returncode()}:\n{daemon.log_tail()}")
            try:
                result = check()
                if result:
                    return result
            except (OSError, ValueError, DaemonError) as e:
                last_error = str(e)
            time.sleep(0.1)
        tails = "\n".join(f"--- {d.name}\n{d.log_tail(10)}" for d in self.gateways + self.kvstores)
        raise DaemonError(f"timed out after {timeout:g}s waiting for {what} {last_error}\n{tails}")

    def wait_for_leader(self, timeout: float = 30.0) -> str:
        """Wait until every running gateway names the same leader; returns its id."""

        def check() -> str | None:
            leaders = {self.status(i).get("leader") for i, g in enumerate(self.gateways) if g.running()}
            return leaders.pop() if len(leaders) == 1 and None not in leaders else None

        return str(self._poll("a Raft leader", check, timeout))

    def wait_for_nodes(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until every running kvstore is up in the ring on every running gateway."""
        wanted = {k.name for k in self.kvstores if k.running()}

        def check() -> dict[str, Any] | None:
            status: dict[str, Any] | None = None
            for i, gateway in enumerate(self.gateways):
                if not gateway.running():
                    continue
                status = self.status(i)
                up = {n["id"] for n in status.get("nodes", []) if n.get("state") == NodeState.UP}
                if not wanted <= up:
                    return None
            return status

        return dict(self._poll(f"kvstores {sorted(wanted)} to be up", check, timeout))

    def has_quorum(self) -> bool:
        """True when a running gateway says its Raft group has a quorum (it can change the cluster map)."""
        for i, gateway in enumerate(self.gateways):
            if gateway.running():
                try:
                    if self.status(i).get("has_quorum"):
                        return True
                except (OSError, ValueError, DaemonError):
                    continue
        return False

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every process this cluster started, followers and kvstores first.

        A kvstore drains on SIGTERM (``chashd.kvstore.drain``): its gateways mark it leaving and it hands its
        data off. With no gateway left that has a quorum (stopped, or too few left running), nothing can
        take the drain and it would only wait out ``timeout``: the kvstores are then killed (SIGKILL).
        """
        drainable = not any(k.running() for k in self.kvstores) or self.has_quorum()
        for daemon in [*reversed(self.followers), *reversed(self.kvstores), *reversed(self.gateways)]:
            try:
                if daemon in self.kvstores and not drainable:
                    daemon.kill()
                else:
                    daemon.stop(timeout)
            except Exception:  # keep stopping the others
                daemon.kill()

    def describe(self) -> str:
        """The endpoints, one line each."""
        lines = []
        for daemon in self.gateways + self.kvstores:
            line = self.line_ports.get(daemon.name)
            raft = self.raft_ports.get(daemon.name)
            extra = f"  raft {daemon.host}:{raft}" if raft is not None else ""
            lines.append(
                f"{daemon.name:12s} http {daemon.url}  memcached {daemon.host}:{line}{extra}  log {daemon.log_path}"
            )
        return "\n".join(lines)
