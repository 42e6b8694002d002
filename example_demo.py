"""chashd demo: start a gateway and a kvstore on this machine and show that they serve.

    ./dev.sh demo

Every process it starts is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from chashd.launcher import Daemon, DaemonError, free_ports


def main() -> int:
    parser = argparse.ArgumentParser(description="chashd demo")
    parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="chashd-demo-"))
    http, raft, line, kv_http, kv_line = free_ports(5)
    gateway = Daemon(
        "chash-gateway",
        "gateway-1",
        [
            "--gateway-id",
            "gateway-1",
            "--port",
            f"tcp:{http}:interface=127.0.0.1",
            "--raft-port",
            str(raft),
            "--line-port",
            f"tcp:{line}:interface=127.0.0.1",
        ],
        http,
        workdir / "gateway-1.log",
    )
    kvstore = Daemon(
        "chash-kvstore",
        "kvstore-A",
        [
            "--node-id",
            "kvstore-A",
            "--port",
            f"tcp:{kv_http}:interface=127.0.0.1",
            "--line-port",
            f"tcp:{kv_line}:interface=127.0.0.1",
            "--gateway",
            f"127.0.0.1:{http}",
        ],
        kv_http,
        workdir / "kvstore-A.log",
    )
    try:
        for daemon in (gateway, kvstore):
            daemon.start()
        for daemon in (gateway, kvstore):
            print(f"{daemon.name:10s} {daemon.url}/health -> {daemon.wait_healthy()}")
        print(f"logs in {workdir}")
    except DaemonError as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        for daemon in (kvstore, gateway):
            daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
