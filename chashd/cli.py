"""The ``chash`` command.

    chash cluster up [--gateways 3] [--kvstores 3] [--data-dir DIR] [--engine memory|sqlite]

Exit codes: 0 ok, 1 not found, 2 usage, 3 server or network error.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from chashd import __version__

__all__ = ["main"]

EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE, EXIT_ERROR = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``chash``."""
    parser = argparse.ArgumentParser(prog="chash", description="Talk to a chashd cluster, or start one locally.")
    parser.add_argument("--version", action="version", version=f"chash {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    cluster = commands.add_parser("cluster", help="run a local cluster of real daemons")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    up = cluster_commands.add_parser("up", help="start gateways and kvstores on free loopback ports until Ctrl-C")
    up.add_argument("--gateways", type=int, default=3, help="number of gateways (default 3)")
    up.add_argument("--kvstores", type=int, default=3, help="number of kvstores (default 3)")
    up.add_argument("--data-dir", type=Path, help="where logs, Raft state and data go (default: a new temp dir)")
    up.add_argument(
        "--engine", choices=("memory", "sqlite"), default="memory", help="kvstore storage engine (default memory)"
    )
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the ring (default 60)")
    return parser


def cluster_up(args: argparse.Namespace) -> int:
    """Start a local cluster, print its endpoints, stop it on Ctrl-C or SIGTERM."""
    from chashd.launcher import DaemonError, LocalCluster

    if args.gateways < 1 or args.kvstores < 0:
        print("chash: --gateways must be at least 1 and --kvstores at least 0", file=sys.stderr)
        return EXIT_USAGE
    workdir = args.data_dir or Path(tempfile.mkdtemp(prefix="chash-cluster-"))
    cluster = LocalCluster(workdir, gateways=args.gateways, kvstores=args.kvstores, engine=args.engine)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        print(f"starting {args.gateways} gateways and {args.kvstores} kvstores in {workdir} ...", file=sys.stderr)
        cluster.start(timeout=args.timeout)
        print(cluster.describe())
        print(f"export CHASH_GATEWAY={','.join(cluster.gateway_urls)}")
        print("ready; Ctrl-C stops the cluster", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            for daemon in cluster.gateways + cluster.kvstores:
                if not daemon.running():
                    print(f"chash: {daemon.name} exited with {daemon.returncode()}", file=sys.stderr)
                    stop.set()
    except KeyboardInterrupt:
        pass
    except DaemonError as e:
        print(f"chash: the cluster did not start: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        print("stopping the cluster ...", file=sys.stderr)
        cluster.stop()
        signal.signal(signal.SIGTERM, previous)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run ``chash``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "cluster":
        return cluster_up(args)
    return EXIT_USAGE  # pragma: no cover - argparse only lets known commands through


if __name__ == "__main__":
    sys.exit(main())
