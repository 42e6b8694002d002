"""Start and stop real chashd daemons on this machine: ``chash cluster up``, the demo and the tests.

Blocking code for scripts (subprocess and urllib), never imported by the daemons themselves. Every
process started here is tracked by its pid and stopped by it: SIGTERM first, SIGKILL after a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Daemon", "DaemonError", "free_ports", "twistd_command"]


class DaemonError(Exception):
    """A daemon did not start, answer or stop as expected. The message quotes the end of its log."""


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports that were free on ``host`` a moment ago."""
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


def twistd_command(role: str, args: Sequence[str]) -> list[str]:
    """The command line that runs ``role`` (``chash-gateway``/``chash-kvstore``) in the foreground."""
    twistd = Path(sys.executable).with_name("twistd")
    prefix = (
        [str(twistd)] if twistd.exists() else [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    )
    return [*prefix, "--nodaemon", "--pidfile=", role, *args]


def http_json(url: str, timeout: float = 2.0, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    """A blocking JSON request: ``(status, parsed body or None)``; raises OSError when unreachable."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
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
    ) -> None:
        self.role = role
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
                twistd_command(self.role, self.args),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
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
            if self.wait(timeout) is None:
                self.kill()
        return self.process.wait()

    def kill(self) -> None:
        """SIGKILL, and reap."""
        if self.process is not None and self.running():
            self.process.kill()
            self.process.wait()
