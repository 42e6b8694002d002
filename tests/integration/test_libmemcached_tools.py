"""Debian's libmemcached-tools (libmemcached 1.1, a C client) against a gateway and a kvstore, each run also
against a real memcached, whose results are the reference: what a user of these tools sees must not change.
The kvstore is one on loopback without a cluster token (its line port takes writes only from connections that
proved the token otherwise, which these tools cannot: SECURITY.md).

``./dev.sh test`` installs the package with apt-get when it can; where it cannot, every test here is skipped
and says so. One test per tool: ``memcping``, ``memcstat``, ``memccp``, ``memccat``, ``memcrm``, ``memcslap``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from chashd.launcher import Daemon, LocalCluster, clean_environ, free_ports

pytestmark = pytest.mark.slow

TOOLS = ("memcping", "memcstat", "memccp", "memccat", "memcrm", "memcslap")
TARGETS = ("gateway", "kvstore", "memcached")
#: Names memcstat lists for memcached that a gateway and a kvstore list too.
COMMON_STATS = {"pid", "uptime", "time", "version", "curr_connections", "total_connections", "cmd_get", "cmd_set",
                "get_hits", "get_misses"}  # fmt: skip


def tool(name: str) -> str:
    """The tool's path; the test is skipped, saying why, when the package is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(
            f"{name} is not installed: Debian's libmemcached-tools could not be installed here "
            "(./dev.sh test installs it with apt-get as root; see its output)"
        )
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One gateway (N=2, W=2, R=1) over two kvstores."""
    args = ["--probe-interval", "0.3", "--replicas", "2", "--read-quorum", "1"]
    with LocalCluster(
        tmp_path_factory.mktemp("libmemcached"), gateways=1, kvstores=2, gateway_args=args, env=clean_environ()
    ) as running:
        yield running


@pytest.fixture(scope="module")
def kvstore_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The line port of a kvstore on loopback without a token (open to plain memcached writes)."""
    http, line = free_ports(2)
    args = ["--node-id", "kv-tools", "--port", f"tcp:{http}:interface=127.0.0.1"]
    args += ["--line-port", f"tcp:{line}:interface=127.0.0.1", "--engine", "memory"]
    workdir: Path = tmp_path_factory.mktemp("kv-tools")
    daemon = Daemon("chash-kvstore", "kv-tools", args, http, workdir / "kv.log", env=clean_environ())
    try:
        daemon.start().wait_healthy(30)
        yield line
    finally:
        daemon.stop(10)


@pytest.fixture(params=TARGETS)
def server(request: pytest.FixtureRequest, cluster: LocalCluster, memcached_port: int, kvstore_port: int) -> str:
    """``127.0.0.1:<port>`` of a gateway's line port, a kvstore's, or memcached's."""
    if request.param == "gateway":
        port = cluster.line_ports[cluster.gateways[0].name]
    elif request.param == "kvstore":
        port = kvstore_port
    else:
        port = memcached_port
    return f"127.0.0.1:{port}"


def run(name: str, server: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a tool against ``server``; its exit status and output (bytes)."""
    command = [tool(name), f"--servers={server}", *args]
    return subprocess.run(command, capture_output=True, timeout=120, cwd=cwd, check=False)


def copied(server: str, directory: Path, prefix: str, body: bytes) -> str:
    """Write ``body`` to a file named after ``prefix`` and the server's port in ``directory``, memccp it there
    (asserting it worked, silently); the file's name, which is the key."""
    name = f"{prefix}-{server.rsplit(':', 1)[1]}"
    (directory / name).write_bytes(body)
    done = run("memccp", server, name, cwd=directory)
    assert (done.returncode, done.stdout) == (0, b""), done.stderr
    return name


class ToolTests:
    """Each tool against a gateway, a kvstore and memcached: the same exit status and output."""

    def test_memcping(self, server: str) -> None:
        """memcping connects and asks the version: exit 0, nothing printed."""
        done = run("memcping", server)
        assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")

    def test_memcstat(self, server: str) -> None:
        """memcstat prints memcached's layout: the server line, then a tab-indented name: value per stat, with
        the common names memcached lists."""
        done = run("memcstat", server)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.decode().splitlines()
        host, port = server.split(":")
        assert lines[0] == f"Server: {host} ({port})"
        stats = dict(line[1:].split(": ", 1) for line in lines[1:] if line.startswith("\t"))
        assert len(stats) == len(lines) - 1, lines
        assert set(stats) >= COMMON_STATS, COMMON_STATS - set(stats)
        assert re.fullmatch(r"1\.6\.\d+.*", stats["version"])

    def test_memccp(self, server: str, tmp_path: Path) -> None:
        """memccp stores a file under its name (exit 0, silent), which a get then reads byte for byte."""
        body = bytes(range(256)) * 10
        name = copied(server, tmp_path, "cp", body)
        done = run("memccat", server, name)
        assert (done.returncode, done.stdout) == (0, body + b"\n")  # memccat ends each value with a newline

    def test_memccat(self, server: str, tmp_path: Path) -> None:
        """memccat prints what memccp stored (and a newline), and exits 1 silently for a key that is not there."""
        name = copied(server, tmp_path, "cat", b"hello from libmemcached\n")
        done = run("memccat", server, name)
        assert (done.returncode, done.stdout) == (0, b"hello from libmemcached\n\n"), done.stderr
        done = run("memccat", server, "no-such-key")
        assert (done.returncode, done.stdout) == (1, b"")

    def test_memcrm(self, server: str, tmp_path: Path) -> None:
        """memcrm deletes a key (exit 0), after which memccat finds nothing; a second memcrm exits 1."""
        name = copied(server, tmp_path, "rm", b"to be removed\n")
        done = run("memcrm", server, name)
        assert (done.returncode, done.stdout) == (0, b""), done.stderr
        assert run("memccat", server, name).returncode == 1
        assert run("memcrm", server, name).returncode == 1

    @pytest.mark.parametrize("test", ["set", "get"])
    def test_memcslap(self, server: str, test: str) -> None:
        """memcslap's set and get loads (two threads; the get load multi-gets what it set) finish with memcached's
        report and no error."""
        done = run("memcslap", server, "--concurrency=2", "--execute-number=200", f"--test={test}")
        assert done.returncode == 0, done.stderr + done.stdout
        report = re.sub(r"\d+\.\d+ seconds", "<t> seconds", done.stdout.decode())
        assert f"Time to {test}             400 keys by    2 threads:     <t> seconds." in report, report
        assert "Failed" not in report + done.stderr.decode()


def memcached_tool(server: str, *mode: str) -> subprocess.CompletedProcess[bytes]:
    """Run memcached's own script, memcached-tool (Debian ships it with memcached), against ``server``."""
    script = Path("/usr/share/memcached/scripts/memcached-tool")
    if not script.exists() or shutil.which("perl") is None:
        pytest.skip("memcached-tool is not installed: it comes with Debian's memcached package (./dev.sh test)")
    return subprocess.run(["perl", str(script), server, *mode], capture_output=True, timeout=60, check=False)


class MemcachedToolTests:
    """memcached-tool (memcached's script: keys and dump read ``lru_crawler metadump all``, display, stats and
    settings read the stats groups) against a gateway, a kvstore and memcached."""

    @pytest.mark.parametrize("mode", ["display", "stats", "settings"])
    def test_reports(self, server: str, mode: str) -> None:
        """display, stats and settings print their tables and exit 0."""
        done = memcached_tool(server, mode)
        assert done.returncode == 0 and done.stdout, done.stderr
        assert b"not a number" not in done.stderr and b"uninitialized" not in done.stderr, done.stderr

    def test_keys_and_dump(self, server: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        """keys lists every item (key, absolute expiry or -1) and dump writes the add commands that load them
        elsewhere; a gateway holds no items, so both list nothing there (and still end)."""
        key = copied(server, tmp_path, "tool", b"dumped value")
        done = memcached_tool(server, "keys")
        assert done.returncode == 0, done.stderr
        dump = memcached_tool(server, "dump")
        assert dump.returncode == 0, dump.stderr
        if request.node.callspec.params["server"] == "gateway":
            assert (done.stdout, dump.stdout) == (b"", b"")
            return
        line = rb"^key=%s exp=-1 la=\d+ cas=\d+ fetch=\w+ cls=\d+ size=\d+$" % key.encode()
        assert re.search(line, done.stdout, re.M), done.stdout
        assert b"add %s 0 0 12\r\ndumped value\r\n" % key.encode() in dump.stdout
