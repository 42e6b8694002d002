"""Real twistd processes on loopback ports, each stopped by its own pid at teardown."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from chashd.launcher import ClusterSecrets, Daemon, clean_environ, free_ports, wait_for

#: Poll a condition, failing the test after a timeout (``chashd.launcher.wait_for``).
wait_until = wait_for


def http(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    """One HTTP request: the status and the body, an error status included."""
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class StartDaemon(Protocol):
    def __call__(
        self, role: str, *args: str, env: dict[str, str] | None = None, wait: bool = True, **kw: Any
    ) -> Daemon: ...


@pytest.fixture
def cluster_secrets() -> ClusterSecrets:
    """A Raft password and a cluster token of the test's own (random, never fixed values)."""
    return ClusterSecrets.generate()


@pytest.fixture
def start_daemon(tmp_path: Path, cluster_secrets: ClusterSecrets) -> Iterator[StartDaemon]:
    """Start a role on a free loopback HTTP port; every daemon is stopped at teardown, even on failure.

    Every daemon gets the test's ``cluster_secrets`` in its environment (``env`` may override them).
    """
    started: list[Daemon] = []

    def start(role: str, *args: str, env: dict[str, str] | None = None, wait: bool = True, **kw: Any) -> Daemon:
        (port,) = free_ports(1)
        name = kw.pop("name", f"{role}-{len(started)}")
        # Never the default ports (11211, 11212, 8001): other software on the machine may hold them.
        extra = [] if "--line-port" in args else ["--line-port", f"tcp:{free_ports(1)[0]}:interface=127.0.0.1"]
        if role == "chash-gateway" and "--raft-port" not in args:
            extra += ["--raft-port", str(free_ports(1)[0])]
        daemon = Daemon(
            role,
            name,
            ["--port", f"tcp:{port}:interface=127.0.0.1", *extra, *args],
            port,
            tmp_path / f"{name}.log",
            env=clean_environ(**{**cluster_secrets.environ(), **(env or {})}),
        )
        started.append(daemon.start())
        if wait:
            daemon.wait_healthy(timeout=30)
        return daemon

    yield start
    for daemon in started:
        daemon.stop(timeout=10)


@pytest.fixture(scope="module")
def memcached_port() -> Iterator[int]:
    """A real memcached on a free loopback port, stopped by its pid at the end."""
    binary = shutil.which("memcached")
    if binary is None:
        pytest.fail("memcached is not installed: run ./dev.sh test, or apt-get install -y memcached")
    (port,) = free_ports(1)
    command = [binary, "-U", "0", "-t", "1", "-l", "127.0.0.1", "-p", str(port), "-m", "64"]
    if os.geteuid() == 0:  # memcached refuses to run as root
        command += ["-u", "nobody"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10.0
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    err = process.stderr.read().decode() if process.stderr else ""
                    pytest.fail(f"memcached did not start on port {port}: {err}")
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
