"""The ``chash`` command: read and write keys, look at the ring, drain nodes, bulk-load, run a local cluster.

    chash [--gateway URL]... [--timeout S] [--token T] COMMAND
      put KEY VALUE|- [--ttl S] [--flags N]   store a value (- reads it from stdin)
      get KEY [--json]                        the value's raw bytes on stdout
      delete KEY                              delete a value
      lookup KEY [--json]                     the key's preference list (primary first)
      ring [--json] [--svg FILE|-]            node, state, weight, share of the ring, keys; --svg draws it
      status [--json]                         gateways, leader, epoch, quorums, rebalancing progress
      nodes [--json] | nodes drain ID | nodes remove ID
      load FILE|- [--format text|jsonl] | load --count N [--size B] [--prefix P]
      cluster up [--gateways 3] [--kvstores 3] [--data-dir DIR] [--engine memory|sqlite]

Gateways come from ``--gateway`` (repeatable, or comma-separated), else ``$CHASH_GATEWAY`` (comma-separated),
else http://127.0.0.1:8000; the client fails over between them. Exit codes: 0 ok, 1 not found, 2 usage
(bad arguments, a key or value the server refuses), 3 server or network error; every error is one line on
stderr.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import re
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, NoReturn

from chashd import __version__

__all__ = ["main"]

EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE, EXIT_ERROR = 0, 1, 2, 3


class _Usage(Exception):
    """A usage error found after parsing (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with errors as one line: ``chash get: error: ... (see chash get --help)``, status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``chash``."""
    parser = _Parser(
        prog="chash",
        description="Talk to a chashd cluster, or start one locally.",
        epilog="gateways: --gateway (repeatable), else $CHASH_GATEWAY (comma-separated), else http://127.0.0.1:8000\n"
        "exit codes: 0 ok, 1 not found, 2 usage, 3 server or network error",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"chash {__version__}")
    parser.add_argument(
        "--gateway",
        action="append",
        metavar="URL",
        help="a gateway's HTTP URL (repeatable; host:port is read as http://host:port)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each answer (default 5)")
    parser.add_argument("--token", help="token for node admin (drain, remove); default $CHASH_TOKEN")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def reading(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        return sub

    put = commands.add_parser("put", help="store a value", description="Store a value under KEY.")
    put.add_argument("key", metavar="KEY")
    put.add_argument("value", metavar="VALUE", help="the value, or - to read it from stdin")
    put.add_argument("--ttl", type=int, default=0, help="seconds to live (memcached exptime: >30 days is a Unix time)")
    put.add_argument("--flags", type=int, default=0, help="opaque unsigned 32-bit flags (memcached clients use them)")

    get = reading("get", "print a value's raw bytes on stdout")
    get.add_argument("key", metavar="KEY")

    delete = commands.add_parser("delete", help="delete a value", description="Delete the value of KEY.")
    delete.add_argument("key", metavar="KEY")

    lookup = reading("lookup", "the nodes that hold a key, primary first")
    lookup.add_argument("key", metavar="KEY")

    ring = reading("ring", "the ring: node, state, weight, share of the ring, keys")
    ring.add_argument(
        "--svg",
        metavar="FILE",
        help="also draw the ring as an SVG picture into FILE (- for stdout instead of the table), "
        "the same picture as the gateway's status page",
    )
    reading("status", "gateways, leader, epoch, quorums and rebalancing progress")

    nodes = reading("nodes", "list the nodes, or drain or remove one")
    node_commands = nodes.add_subparsers(dest="node_command", metavar="ACTION", parser_class=_Parser)
    drain = node_commands.add_parser("drain", help="mark a node leaving: it hands its data off, then leaves")
    remove = node_commands.add_parser("remove", help="remove a node from the ring at once")
    for action in (drain, remove):
        action.add_argument("node_id", metavar="ID")
        # Also after the action (chash nodes drain ID --json); SUPPRESS keeps a --json given before it.
        action.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the answer as JSON")

    load = commands.add_parser(
        "load",
        help="bulk-load keys from a file or generated ones, with a progress bar",
        description="Store many keys. FILE (or - for stdin) holds one key a line: 'KEY VALUE' (split at the "
        'first space or tab) or, with --format jsonl, {"key": ..., "value": ..., "ttl": ..., "flags": ...}. '
        "--count N stores N generated keys PREFIXi instead.",
    )
    source = load.add_mutually_exclusive_group(required=True)
    source.add_argument("file", metavar="FILE", nargs="?", help="the file to load, or - for stdin")
    source.add_argument("--count", type=int, help="store N generated keys instead")
    load.add_argument("--format", choices=("text", "jsonl"), default="text", help="FILE's format (default text)")
    load.add_argument("--prefix", default="key:", help="prefix of the generated keys (default key:)")
    load.add_argument("--size", type=int, default=100, help="bytes of each generated value (default 100)")
    load.add_argument("--ttl", type=int, default=0, help="seconds to live of every key (default: none)")
    load.add_argument("--flags", type=int, default=0, help="flags of every key without its own (default 0)")
    load.add_argument("--workers", type=int, default=4, help="requests in flight at once (default 4)")
    load.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="show the progress bar: auto (when stderr is a terminal), always or never",
    )

    cluster = commands.add_parser("cluster", help="run a local cluster of real daemons")
    cluster_commands = cluster.add_subparsers(
        dest="cluster_command", metavar="ACTION", required=True, parser_class=_Parser
    )
    up = cluster_commands.add_parser("up", help="start gateways and kvstores on free loopback ports until Ctrl-C")
    up.add_argument("--gateways", type=int, default=3, help="number of gateways (default 3)")
    up.add_argument("--kvstores", type=int, default=3, help="number of kvstores (default 3)")
    up.add_argument("--data-dir", type=Path, help="where logs, Raft state and data go (default: a new temp dir)")
    up.add_argument(
        "--engine", choices=("memory", "sqlite"), default="memory", help="kvstore storage engine (default memory)"
    )
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the ring (default 60)")
    return parser


# -- output helpers ------------------------------------------------------------------------------------


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _print_json(value: Any) -> None:
    _out(json.dumps(value, indent=2, sort_keys=True))


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[int] = ()) -> str:
    """A plain text table; columns listed in ``right`` are right-aligned (numbers)."""
    cells = [[str(c) for c in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _address(node: dict[str, Any]) -> str:
    host = node.get("host", "?")
    return f"{host}:{node.get('port', '?')}"


def _progress_text(handoff: Any) -> str:
    """A node's handoff report in a few words: ``moving, arcs 3/8, sent 1200, received 0, pending 40``."""
    if not isinstance(handoff, dict) or not handoff:
        return "-"
    parts = []
    if handoff.get("running"):
        parts.append("moving")
    if handoff.get("arcs_total"):
        parts.append(f"arcs {handoff.get('arcs_done', 0)}/{handoff['arcs_total']}")
    for name, word in (("records_sent", "sent"), ("records_received", "received"), ("pending", "pending")):
        if isinstance(handoff.get(name), int):
            parts.append(f"{word} {handoff[name]}")
    if handoff.get("synced_epoch") is not None:
        parts.append(f"synced epoch {handoff['synced_epoch']}")
    if handoff.get("rate_limit") not in (None, "unlimited"):
        parts.append(f"limit {handoff['rate_limit']}")
    if not parts:  # a report of another shape: its scalar fields
        parts = [f"{k.replace('_', ' ')} {v}" for k, v in handoff.items() if not isinstance(v, (dict, list))]
    return ", ".join(parts) or "-"


# -- commands ----------------------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Any:
    from chashd.client import KVStoreClient

    try:
        return KVStoreClient(args.gateway, timeout=args.timeout, token=args.token or os.environ.get("CHASH_TOKEN"))
    except ValueError as e:
        raise _Usage(str(e)) from None


def cmd_put(args: argparse.Namespace) -> int:
    """``chash put KEY VALUE|-``."""
    value = sys.stdin.buffer.read() if args.value == "-" else os.fsencode(args.value)
    _client(args).put(args.key, value, ttl=args.ttl or None, flags=args.flags)
    return EXIT_OK


def cmd_get(args: argparse.Namespace) -> int:
    """``chash get KEY``: raw bytes to stdout, or a JSON object with ``--json``."""
    item = _client(args).get_item(args.key)
    if item is None:
        return _not_found(f"no value for key {args.key!r}")
    if args.json:
        try:
            value, encoding = item.value.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            value, encoding = base64.b64encode(item.value).decode("ascii"), "base64"
        _print_json(
            {
                "key": item.key,
                "value": value,
                "encoding": encoding,
                "flags": item.flags,
                "cas": item.cas,
                "expires_at": item.expires_at,
            }
        )
    else:
        sys.stdout.flush()
        sys.stdout.buffer.write(item.value)
        sys.stdout.buffer.flush()
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    """``chash delete KEY``."""
    if not _client(args).delete(args.key):
        return _not_found(f"no value for key {args.key!r}")
    return EXIT_OK


def cmd_lookup(args: argparse.Namespace) -> int:
    """``chash lookup KEY``: the preference list."""
    found = _client(args).lookup(args.key)
    if args.json:
        _print_json(found)
        return EXIT_OK
    _out(f"key {found.get('key')!r}: hash {found.get('hash')}, epoch {found.get('epoch')}, N={found.get('replicas')}")
    rows = []
    for i, node in enumerate(found.get("nodes", [])):
        role = "primary" if i == 0 else f"replica {i}"
        rows.append([i + 1, node.get("id"), node.get("state"), _address(node), node.get("line_port"), role])
    _out(_table(["#", "NODE", "STATE", "HTTP", "LINE PORT", "ROLE"], rows, right=(0,)))
    return EXIT_OK


def _ring_rows(ring: dict[str, Any], status: dict[str, Any]) -> list[dict[str, Any]]:
    from chashd.client import ServerError
    from chashd.ring import HashRing

    try:
        shares = HashRing.from_dict(ring).shares()
    except ValueError as e:
        raise ServerError(f"the gateway's ring cannot be rebuilt: {e}") from None
    rows: list[dict[str, Any]] = []
    seen = set()
    for node in status.get("nodes", []) + ring.get("nodes", []) + ring.get("leaving", []):
        node_id = node.get("id")
        if node_id in seen:
            continue
        seen.add(node_id)
        rows.append(
            {
                "id": node_id,
                "state": node.get("state"),
                "weight": node.get("weight"),
                "share": shares.get(node_id, 0.0),
                "keys": node.get("keys"),
                "host": node.get("host"),
                "port": node.get("port"),
                "line_port": node.get("line_port"),
            }
        )
    return rows


def cmd_ring(args: argparse.Namespace) -> int:
    """``chash ring``: node, state, weight, share of the ring, keys."""
    client = _client(args)
    ring = client.ring()
    status = client.status()
    rows = _ring_rows(ring, status)
    if args.svg:
        from chashd.ring import HashRing
        from chashd.ringsvg import ring_svg

        svg = ring_svg(HashRing.from_dict(ring), {r["id"]: r["state"] for r in rows if r["state"]})
        if args.svg == "-":
            sys.stdout.write(svg)
            return EXIT_OK
        try:
            Path(args.svg).write_text(svg, encoding="utf-8")
        except OSError as e:
            raise _Usage(f"--svg: cannot write {args.svg}: {e.strerror}") from None
    if args.json:
        _print_json({"epoch": ring.get("epoch"), "points_per_node": ring.get("points_per_node"), "nodes": rows})
        return EXIT_OK
    _out(f"epoch {ring.get('epoch')}, {len(ring.get('nodes', []))} nodes in the ring, {ring.get('algorithm')}")
    table = [
        [r["id"], r["state"], r["weight"], f"{100 * r['share']:.1f}%", r["keys"], f"{r['host']}:{r['port']}"]
        for r in rows
    ]
    _out(_table(["NODE", "STATE", "WEIGHT", "SHARE", "KEYS", "HTTP"], table, right=(2, 3, 4)))
    return EXIT_OK


def _leader_text(status: dict[str, Any]) -> str:
    """The leader of a ``/ring/status`` answer, for ``chash status``: a gateway whose map is not current names
    none (``leader`` null) and still gives the one it last knew as ``last_leader``."""
    leader = status.get("leader")
    if leader:
        return str(leader)
    last = status.get("last_leader")
    if last:
        return f"none (no Raft leader heard from within the election timeout; the last one known is {last})"
    return "none (no Raft quorum)"


def cmd_status(args: argparse.Namespace) -> int:
    """``chash status``: gateways, leader, epoch, rebalancing progress."""
    status = _client(args).status()
    if args.json:
        _print_json(status)
        return EXIT_OK
    leader = status.get("leader")
    _out(
        f"answered by {status.get('gateway_id')}; leader {_leader_text(status)}; "
        f"epoch {status.get('epoch')}; N={status.get('replicas')} W={status.get('write_quorum')} "
        f"R={status.get('read_quorum')}"
    )
    gateways = [
        [g.get("id"), "leader" if g.get("id") == leader else "", g.get("url"), g.get("raft")]
        for g in status.get("gateways", [])
    ]
    if gateways:
        _out("")
        _out(_table(["GATEWAY", "ROLE", "HTTP", "RAFT"], gateways))
    nodes = status.get("nodes", [])
    states: dict[str, int] = {}
    for node in nodes:
        state = str(node.get("state"))
        states[state] = states.get(state, 0) + 1
    summary = ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
    _out("")
    _out(f"rebalancing: {'yes' if status.get('rebalancing') else 'no'}; nodes: {summary or 'none'}")
    rows = [[n.get("id"), n.get("state"), n.get("keys"), _progress_text(n.get("handoff"))] for n in nodes]
    if rows:
        _out(_table(["NODE", "STATE", "KEYS", "HANDOFF"], rows, right=(2,)))
    return EXIT_OK


def cmd_nodes(args: argparse.Namespace) -> int:
    """``chash nodes [drain|remove ID]``."""
    client = _client(args)
    if args.node_command is None:
        nodes = client.nodes()
        if args.json:
            _print_json(nodes)
            return EXIT_OK
        rows = [[n.get("id"), n.get("state"), n.get("weight"), _address(n), n.get("line_port")] for n in nodes]
        _out(_table(["NODE", "STATE", "WEIGHT", "HTTP", "LINE PORT"], rows, right=(2,)))
        return EXIT_OK
    if args.node_command == "drain":
        answer = client.drain(args.node_id)
        verb = "drains: it hands its data off, then leaves the ring"
    else:
        answer = client.remove(args.node_id)
        verb = "is removed from the ring"
    if args.json:
        _print_json(answer)
    else:
        _out(f"{args.node_id} {verb} ({answer.get('result')}, epoch {answer.get('epoch')})")
    return EXIT_OK


# -- bulk load -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One key to load, with where it came from (for error messages)."""

    where: str
    key: str
    value: bytes
    ttl: int
    flags: int


def _entries_from_lines(lines: IO[bytes], name: str, fmt: str, ttl: int, flags: int) -> Iterator[_Entry]:
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip(b"\r\n")
        if not line.strip():
            continue
        where = f"{name}:{number}"
        if fmt == "jsonl":
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict) or not isinstance(obj.get("key"), str):
                    raise ValueError("not an object with a string 'key'")
                value = obj.get("value", "")
                data = value.encode("utf-8") if isinstance(value, str) else None
                if data is None:
                    raise ValueError("'value' must be a string")
                yield _Entry(where, obj["key"], data, int(obj.get("ttl", ttl)), int(obj.get("flags", flags)))
            except (ValueError, TypeError) as e:
                raise _Usage(f"{where}: not a JSON line of this format: {e}") from None
        else:
            parts = re.split(rb"[ \t]", line, maxsplit=1)
            key = parts[0].decode("utf-8", "surrogateescape")
            yield _Entry(where, key, parts[1] if len(parts) > 1 else b"", ttl, flags)


def _generated(count: int, prefix: str, size: int, ttl: int, flags: int) -> Iterator[_Entry]:
    for i in range(count):
        key = f"{prefix}{i}"
        seed = f"{key}:".encode()
        value = (seed * (size // len(seed) + 1))[:size]
        yield _Entry(f"#{i}", key, value, ttl, flags)


def _count_lines(path: Path) -> int | None:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return None


def _progress_bar(total: int | None, mode: str) -> Any:
    from tqdm import tqdm

    disable = {"always": False, "never": True}.get(mode, not sys.stderr.isatty())
    return tqdm(total=total, unit="key", desc="loading", file=sys.stderr, disable=disable, dynamic_ncols=True)


def cmd_load(args: argparse.Namespace) -> int:
    """``chash load FILE|-`` or ``chash load --count N``: store many keys, several requests in flight."""
    from chashd.client import ChashError, Unreachable

    if args.workers < 1 or args.size < 0 or (args.count is not None and args.count < 0):
        raise _Usage("--workers must be at least 1, --size and --count not negative")
    client = _client(args)
    opened: IO[bytes] | None = None
    if args.count is not None:
        entries: Iterator[_Entry] = _generated(args.count, args.prefix, args.size, args.ttl, args.flags)
        total: int | None = args.count
    elif args.file == "-":
        entries, total = _entries_from_lines(sys.stdin.buffer, "stdin", args.format, args.ttl, args.flags), None
    else:
        path = Path(args.file)
        try:
            opened = open(path, "rb")  # noqa: SIM115 - closed in the finally below
        except OSError as e:
            raise _Usage(f"cannot read {args.file}: {e.strerror}") from None
        total = _count_lines(path)
        entries = _entries_from_lines(opened, args.file, args.format, args.ttl, args.flags)

    failures: list[str] = []
    stored = 0
    started = time.monotonic()
    bar = _progress_bar(total, args.progress)
    fatal: BaseException | None = None

    def store(entry: _Entry) -> None:
        client.put(entry.key, entry.value, ttl=entry.ttl or None, flags=entry.flags)

    try:
        with ThreadPoolExecutor(max_workers=args.workers, thread_name_prefix="chash-load") as pool:
            pending: dict[Future[None], _Entry] = {}
            source = iter(entries)
            window = args.workers * 4
            while True:
                for entry in itertools.islice(source, window - len(pending)):
                    pending[pool.submit(store, entry)] = entry
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    entry = pending.pop(future)
                    error = future.exception()
                    if error is None:
                        stored += 1
                    elif isinstance(error, Unreachable):
                        fatal = error
                    elif isinstance(error, ChashError):
                        failures.append(f"{entry.where} key {entry.key!r}: {error}")
                    else:
                        fatal = error
                    bar.update(1)
                if fatal is not None:
                    for future in pending:
                        future.cancel()
                    break
    except KeyboardInterrupt:
        bar.close()
        _summary(stored, failures, started, interrupted=True)
        return 130
    finally:
        bar.close()
        if opened is not None:
            opened.close()
    if fatal is not None:
        if stored or failures:
            _summary(stored, failures, started, interrupted=False)
        raise fatal
    _summary(stored, failures, started, interrupted=False)
    return EXIT_ERROR if failures else EXIT_OK


def _summary(stored: int, failures: list[str], started: float, interrupted: bool) -> None:
    elapsed = max(time.monotonic() - started, 1e-9)
    for failure in failures[:5]:
        print(f"chash: failed: {failure}", file=sys.stderr)
    if len(failures) > 5:
        print(f"chash: ... and {len(failures) - 5} more failures", file=sys.stderr)
    stop = " (interrupted)" if interrupted else ""
    print(
        f"stored {stored} keys in {elapsed:.1f}s ({stored / elapsed:.0f} keys/s), {len(failures)} failed{stop}",
        file=sys.stderr,
    )


# -- the local cluster -----------------------------------------------------------------------------------


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
        print(f"export CHASH_TOKEN=$(cat {shlex.quote(str(cluster.secrets_dir / 'token'))})")
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


# -- main ------------------------------------------------------------------------------------------------


def _not_found(message: str) -> int:
    print(f"chash: {message}", file=sys.stderr)
    return EXIT_NOT_FOUND


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "put": cmd_put,
    "get": cmd_get,
    "delete": cmd_delete,
    "lookup": cmd_lookup,
    "ring": cmd_ring,
    "status": cmd_status,
    "nodes": cmd_nodes,
    "load": cmd_load,
    "cluster": cluster_up,
}


def _exit_code(error: Exception) -> int:
    from chashd.client import NotFound, Rejected, Unauthorized

    if isinstance(error, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(error, Rejected) and not isinstance(error, Unauthorized):
        return EXIT_USAGE
    return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    """Run ``chash``; returns the exit status."""
    from chashd.client import ChashError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return _COMMANDS[args.command](args)
    except _Usage as e:
        print(f"chash {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ChashError as e:
        print(f"chash: {e}", file=sys.stderr)
        return _exit_code(e)
    except BrokenPipeError:
        # The reader went away (chash get k | head -c1): not an error worth a line.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print("chash: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
