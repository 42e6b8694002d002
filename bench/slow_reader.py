"""Slow readers against a gateway: clients that pipeline gets of a large value and never read the replies.

    python bench/slow_reader.py [--connections 6] [--requests 400] [--value-size 1000000] [--max-growth-mib 64]

Issue 10 found that one such client pinned about 245 MB of a gateway (256 pending replies of 1 MB) and six
took it to 1.5 GB. This starts one gateway over three kvstores (memory engine, ``chashd.launcher.LocalCluster``),
stores one value of ``--value-size`` bytes through it, and measures the gateway's resident memory
(``/proc/<pid>/status`` VmRSS):

- **slow readers**: ``--connections`` clients each send ``--requests`` pipelined ``get``s of that value in one
  go and never read a byte; the growth is taken once the gateway stopped taking their requests (its
  ``cmd_get`` unchanged for 1.5 s) and includes the peak seen meanwhile;
- **readers** (the baseline, in the same run): as many clients send the same gets and read every reply.

Printed: both growths in MiB, their ratio, and the gets the gateway ran for the slow readers. Exit status 1
when the slow readers' growth is over ``--max-growth-mib`` (tests/integration/test_security.py runs this).
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

from chashd.launcher import LocalCluster

HOST = "127.0.0.1"
MIB = 1024 * 1024


def rss(pid: int) -> int:
    """The resident memory of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for pid {pid}")


def command(port: int, line: bytes, end: bytes) -> bytes:
    """Send one command on a fresh connection; the reply up to ``end``."""
    with socket.create_connection((HOST, port), timeout=30) as s:
        s.sendall(line)
        reply = b""
        while not reply.endswith(end):
            chunk = s.recv(1 << 20)
            if not chunk:
                raise OSError(f"closed after {len(reply)} bytes")
            reply += chunk
    return reply


def gets_run(port: int) -> int:
    """The gateway's ``cmd_get`` counter."""
    for line in command(port, b"stats\r\n", b"END\r\n").split(b"\r\n"):
        if line.startswith(b"STAT cmd_get "):
            return int(line.split()[2])
    raise OSError("no cmd_get in stats")


def slow_readers(port: int, connections: int, request: bytes) -> list[socket.socket]:
    """Open ``connections`` clients that send ``request`` (as much as the gateway takes) and never read."""
    clients = []
    for _ in range(connections):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # little room for replies on our side
        s.connect((HOST, port))
        s.setblocking(False)
        sent = 0
        while sent < len(request):
            try:
                sent += s.send(request[sent:])
            except BlockingIOError:
                break  # the gateway stopped reading: what it took is enough
        clients.append(s)
    return clients


def quiet_peak(pid: int, port: int, before: int, timeout: float = 60.0) -> tuple[int, int]:
    """Wait until the gateway's ``cmd_get`` stays the same for three polls half a second apart (it stopped
    taking requests); the highest RSS seen meanwhile and that ``cmd_get``."""
    peak, last, same = before, -1, 0
    deadline = time.monotonic() + timeout
    while same < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
        peak = max(peak, rss(pid))
        now = gets_run(port)
        same = same + 1 if now == last else 0
        last = now
    return max(peak, rss(pid)), last


def readers(port: int, connections: int, request: bytes, replies: int, pid: int) -> int:
    """``connections`` clients that send ``request`` and read its ``replies`` whole; the peak RSS seen."""
    clients = [socket.create_connection((HOST, port), timeout=60) for _ in range(connections)]
    peak = 0
    try:
        for s in clients:
            s.sendall(request)
        for s in clients:
            count, tail = 0, b""
            while count < replies:
                chunk = s.recv(1 << 20)
                if not chunk:
                    raise OSError("the gateway closed a reading client")
                data = tail + chunk  # the tail (4 bytes) cannot hold a whole END line of its own
                count += data.count(b"END\r\n")
                tail = data[-4:]
                peak = max(peak, rss(pid))
    finally:
        for s in clients:
            s.close()
    return peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=6)
    parser.add_argument("--requests", type=int, default=400, help="pipelined gets per connection")
    parser.add_argument("--value-size", type=int, default=1_000_000)
    parser.add_argument("--max-growth-mib", type=float, default=64.0)
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="chashd-bench-slow-reader-") as workdir,
        LocalCluster(Path(workdir), gateways=1, kvstores=3) as cluster,
    ):
        gateway = cluster.gateways[0]
        assert gateway.pid is not None
        port = cluster.line_ports[gateway.name]
        value = b"v" * args.value_size
        stored = command(port, b"set slow:big 0 0 %d\r\n%s\r\n" % (len(value), value), b"\r\n")
        if stored != b"STORED\r\n":
            raise SystemExit(f"cannot store the value: {stored[:100]!r}")
        command(port, b"get slow:big\r\n", b"END\r\n")  # warm: the gateway has handled one reply this large
        request = b"get slow:big\r\n" * args.requests

        before = rss(gateway.pid)
        gets_before = gets_run(port)
        clients = slow_readers(port, args.connections, request)
        peak, gets_after = quiet_peak(gateway.pid, port, before)
        for s in clients:
            s.close()
        slow_growth = peak - before
        ran = gets_after - gets_before
        print(f"gateway RSS growth, {args.connections} connections x {args.requests} pipelined gets of "
              f"{args.value_size:,} bytes:")  # fmt: skip
        print(f"  slow readers (never read): {slow_growth / MIB:7.1f} MiB   ({ran} gets run for them)", flush=True)

        time.sleep(1.0)  # let the closed connections go before the baseline (a measurement pause, no check)
        base_before = rss(gateway.pid)
        base_peak = readers(port, args.connections, b"get slow:big\r\n" * min(args.requests, 50), 50, gateway.pid)
        base_growth = max(0, base_peak - base_before)

    print(f"  readers (baseline, 50 gets each, read): {base_growth / MIB:7.1f} MiB")
    ratio = slow_growth / base_growth if base_growth else float("inf")
    print(f"  slow readers / readers: {ratio:.2f}x;  bound {args.max_growth_mib:g} MiB: "
          f"{'ok' if slow_growth <= args.max_growth_mib * MIB else 'EXCEEDED'}")  # fmt: skip
    return 0 if slow_growth <= args.max_growth_mib * MIB else 1


if __name__ == "__main__":
    sys.exit(main())
