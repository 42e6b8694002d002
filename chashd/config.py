"""Configuration of both roles: one loader, one table of options per role.

Every option is a field of ``GatewayConfig`` or ``KVStoreConfig`` with its flag, environment variables,
YAML key and default in the field's metadata. A value is taken from the first place that has it:

1. the command line (``--raft-port 8001``);
2. the environment: the short names (``GATEWAY_ID``, ``LISTEN_PORT``, ``RAFT_PORT``, ``PEER_GATEWAYS``,
   ``NODE_ID``, ``GATEWAY_ADDRESS``) and ``CHASHD_<OPTION>`` for every option (``CHASHD_RAFT_PORT``);
3. the YAML file named by ``--config`` (or ``CHASHD_CONFIG``): a mapping whose keys are the option
   names (``raft-port`` or ``raft_port``);
4. the default.

A bad value raises ``ConfigError`` with one line naming the option and where the value came from.
``options_for()`` turns a table into the ``usage.Options`` class twistd shows and parses.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml
from twisted.python import usage

from chashd.errors import ConfigError
from chashd.kvstore.pacing import Rate
from chashd.logs import LOG_FORMATS

__all__ = [
    "ConfigError",
    "GatewayConfig",
    "KVStoreConfig",
    "OptionSpec",
    "check_secrets",
    "listens_beyond_loopback",
    "load_config",
    "option_specs",
    "options_for",
    "endpoint_port",
    "parse_endpoint",
    "parse_host_port",
    "parse_host_ports",
]

C = TypeVar("C")

_ENDPOINT_TYPES = ("tcp", "tcp6", "ssl", "unix", "systemd")


# -- value parsers: each takes what was written (a str from the command line or the environment, any
# YAML scalar or list from the file) and returns the value or raises ValueError saying what is wrong.


def _port_number(text: str) -> int:
    if not re.fullmatch(r"\d{1,5}", text) or int(text) > 65535:
        raise ValueError(f"{text!r} is not a port number (0-65535)")
    return int(text)


def parse_port(raw: object) -> int:
    """A TCP port number."""
    return _port_number(str(raw).strip())


def parse_endpoint(raw: object) -> str:
    """A bare port number (``8000``) or a Twisted server endpoint string (``tcp:8000:interface=::1``)."""
    text = str(raw).strip()
    if text.isdigit():
        return f"tcp:{_port_number(text)}"
    kind, _, rest = text.partition(":")
    if kind not in _ENDPOINT_TYPES or not rest:
        raise ValueError(
            f"{text!r} is neither a port number nor an endpoint string such as tcp:8000:interface=127.0.0.1"
        )
    if kind in ("tcp", "tcp6", "ssl"):
        port = endpoint_port(text)
        if port is None or port > 65535:
            raise ValueError(f"{text!r} names no port number (0-65535)")
    return text


def _endpoint_args(description: str) -> tuple[str, list[str], dict[str, str]]:
    """An endpoint string's kind, positional and named arguments (``\\:`` unescaped)."""
    kind, _, rest = description.partition(":")
    args = [re.sub(r"\\(.)", r"\1", a) for a in re.split(r"(?<!\\):", rest)]
    return kind, [a for a in args if "=" not in a], dict(a.split("=", 1) for a in args if "=" in a)


def endpoint_port(description: str) -> int | None:
    """The TCP port of a server endpoint string (``tcp:8000:interface=::1`` gives 8000), else None."""
    kind, positional, named = _endpoint_args(description)
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    port = named.get("port", positional[0] if positional else "")
    return int(port) if port.isdigit() else None


def parse_host_port(raw: object) -> str:
    """``host:port`` (an IPv6 host in brackets: ``[::1]:8001``)."""
    text = str(raw).strip()
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d+)", text)
    if not match:
        raise ValueError(f"{text!r} is not host:port")
    _port_number(match.group(2))
    return text


def _items(raw: object) -> list[str]:
    """The items of a comma- or space-separated list, or of a YAML list."""
    items = [str(x) for x in raw] if isinstance(raw, (list, tuple)) else re.split(r"[,\s]+", str(raw).strip())
    return [item for item in items if item]


def parse_host_ports(raw: object) -> tuple[str, ...]:
    """A list of ``host:port``: comma- or space-separated, or a YAML list."""
    return tuple(parse_host_port(item) for item in _items(raw))


def parse_gateways(raw: object) -> tuple[str, ...]:
    """Gateway addresses: ``host:port`` or ``http(s)://host:port``, comma- or space-separated."""
    result = []
    for item in _items(raw):
        if re.match(r"https?://", item):
            scheme, _, rest = item.partition("://")
            parse_host_port(rest.rstrip("/"))
            result.append(f"{scheme}://{rest.rstrip('/')}")
        else:
            result.append(f"http://{parse_host_port(item)}")
    return tuple(result)


def parse_workers(raw: object) -> int:
    """A number of worker processes from 1 to 256, or ``auto``: the CPUs this process may run on."""
    if str(raw).strip().lower() == "auto":
        try:
            cpus = len(os.sched_getaffinity(0))
        except OSError:  # a seccomp filter that refuses the call
            cpus = os.cpu_count() or 1
        return max(1, min(256, cpus))
    value: int = _bounded(int, 1, 256)(raw)
    return value


def parse_bool(raw: object) -> bool:
    """true/false, yes/no, on/off, 1/0."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{raw!r} is not a boolean (true/false)")


def _bounded(kind: type, low: float | None = None, high: float | None = None) -> Callable[[object], Any]:
    def parse(raw: object) -> Any:
        if isinstance(raw, bool):
            raise ValueError(f"{raw!r} is not a number")
        try:
            value = kind(str(raw).strip()) if not isinstance(raw, (int, float)) else kind(raw)
        except (TypeError, ValueError):
            what = "an integer" if kind is int else "a number"
            raise ValueError(f"{raw!r} is not {what}") from None
        if kind is int and isinstance(raw, float) and raw != int(raw):
            raise ValueError(f"{raw!r} is not an integer")
        if low is not None and value < low:
            raise ValueError(f"{raw!r} is below the minimum {low:g}")
        if high is not None and value > high:
            raise ValueError(f"{raw!r} is above the maximum {high:g}")
        return value

    parse.__doc__ = f"{'an integer' if kind is int else 'a number'}" + (f" >= {low:g}" if low is not None else "")
    return parse


def parse_node_id(raw: object) -> str:
    """A node or gateway id: 1 to 64 letters, digits, '.', '_' or '-'."""
    text = str(raw).strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", text):
        raise ValueError(f"{text!r} is not an id (1-64 letters, digits, '.', '_', '-', starting alphanumeric)")
    return text


def parse_host(raw: object) -> str:
    """A host name or IP address."""
    text = str(raw).strip()
    if not re.fullmatch(r"[A-Za-z0-9_.:-]+", text):
        raise ValueError(f"{text!r} is not a host name or address")
    return text


def parse_choice(*choices: str) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        text = str(raw).strip()
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    parse.__doc__ = "one of " + ", ".join(choices)
    return parse


def parse_text(raw: object) -> str:
    """Any text."""
    return str(raw)


def parse_secret(raw: object) -> str:
    """A secret (a password or a token): any text but blanks, never repeated in an error."""
    text = str(raw).strip()
    if not text:
        raise ValueError("the secret is empty")
    return text


def parse_path(raw: object) -> str:
    """A file system path."""
    text = str(raw).strip()
    if not text:
        raise ValueError("the path is empty")
    return text


# -- the option table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptionSpec:
    """How one option is written and read."""

    name: str
    help: str
    default: Any
    parse: Callable[[object], Any]
    env: tuple[str, ...]
    flag: bool = False
    required: bool = False
    metavar: str = ""
    secret: bool = False

    @property
    def cli(self) -> str:
        """The long command-line flag."""
        return "--" + self.name.replace("_", "-")

    @property
    def yaml_key(self) -> str:
        """The key in the YAML file (underscores are accepted too)."""
        return self.name.replace("_", "-")


def opt(
    help: str,
    default: Any = None,
    parse: Callable[[object], Any] = parse_text,
    env: Iterable[str] = (),
    flag: bool = False,
    required: bool = False,
    metavar: str = "",
    secret: bool = False,
) -> Any:
    """Declare a config field: ``port: str = opt("HTTP listen endpoint", "tcp:8000", parse_endpoint)``."""
    meta = {
        "help": help,
        "parse": parse,
        "env": tuple(env),
        "flag": flag,
        "required": required,
        "metavar": metavar,
        "secret": secret,
        "default": default,
    }
    return field(default=default, metadata={"chashd": meta})


def option_specs(config_class: type) -> list[OptionSpec]:
    """The options of a config dataclass, in declaration order."""
    specs = []
    for f in dataclasses.fields(config_class):
        meta = f.metadata["chashd"]
        env = tuple(meta["env"]) + ("CHASHD_" + f.name.upper(),)
        specs.append(
            OptionSpec(
                name=f.name,
                help=meta["help"],
                default=meta["default"],
                parse=meta["parse"],
                env=tuple(dict.fromkeys(env)),
                flag=meta["flag"],
                required=meta["required"],
                metavar=meta["metavar"],
                secret=meta["secret"],
            )
        )
    return specs


_MAX_CONNECTIONS_HELP = (
    "most open client connections per listener (past it the one idle longest makes room, else refused)"
)
_TLS_CA_HELP = (
    "PEM file of the CA that signs the daemons' certificates: links to kvstores (line protocol, health probes, "
    "handoff) use TLS verified against it, and so do https:// gateway URLs"
)
_CLIENT_TIMEOUT_HELP = "close a client connection that takes this many seconds to send one request (0: never)"
_PENDING_BYTES_HELP = (
    "bytes of replies one line-protocol connection may have pending before its reading pauses (a read in flight "
    "counts its keys at the value limit: at the default limits, pipelined gets run one at a time)"
)


@dataclass(frozen=True)
class KVStoreConfig:
    """The kvstore role's options."""

    node_id: str = opt("unique id of this kvstore node", parse=parse_node_id, env=["NODE_ID"], required=True)
    port: str = opt("HTTP API: a port or an endpoint string", "tcp:8080", parse_endpoint, ["LISTEN_PORT"])
    line_port: str = opt("memcached line protocol: a port or an endpoint string", "tcp:11212", parse_endpoint)
    gateway: tuple[str, ...] = opt(
        "gateways to register with: host:port or URL, comma- or space-separated",
        (),
        parse_gateways,
        ["GATEWAY_ADDRESS"],
    )
    advertise_host: str = opt("host or address the gateways use to reach this node", "127.0.0.1", parse_host)
    data_dir: str | None = opt("directory for the SQLite database (selects the sqlite engine)", None, parse_path)
    engine: str | None = opt(
        "storage engine: sqlite (needs --data-dir) or memory; default: sqlite with --data-dir, else memory",
        None,
        parse_choice("sqlite", "memory"),
    )
    memory_limit: int = opt(
        "memory engine: most MiB the records may take (keys, values, per-item overhead; memcached's -m); 0: no limit",
        0,
        _bounded(int, 0, 64 * 1024 * 1024),
    )
    memory_full: str = opt(
        "memory engine at --memory-limit: evict least recently used records, or error (refuse writes: memcached's -M)",
        "evict",
        parse_choice("evict", "error"),
    )
    disk_limit: int = opt(
        "sqlite engine: most MiB the database file may take; writes past it are refused; 0: no limit",
        0,
        _bounded(int, 0, 64 * 1024 * 1024 * 1024),
    )
    weight: int = opt("share of the ring relative to other nodes", 100, _bounded(int, 1, 1_000_000))
    token: str | None = opt(
        "cluster token: guards writes and internal commands (SECURITY.md)", None, parse_secret, secret=True
    )
    token_file: str | None = opt("file holding --token (its first line)", None, parse_path)
    tls_ca: str | None = opt(_TLS_CA_HELP, None, parse_path)
    register_interval: float = opt("seconds between re-registrations", 30.0, _bounded(float, 0.1))
    max_value_size: int = opt("largest value in bytes", 1024 * 1024, _bounded(int, 1, 128 * 1024 * 1024))
    max_connections: int = opt(_MAX_CONNECTIONS_HELP, 1024, _bounded(int, 1))
    max_keys: int = opt("most keys in one multi-key get (line protocol)", 2048, _bounded(int, 1, 65536))
    idle_timeout: float = opt("close a client connection idle this many seconds (0: never)", 600.0, _bounded(float, 0))
    client_timeout: float = opt(_CLIENT_TIMEOUT_HELP, 30.0, _bounded(float, 0))
    max_pending_bytes: int = opt(_PENDING_BYTES_HELP, 1024 * 1024, _bounded(int, 65536))
    enable_shutdown: bool = opt(
        "let the line protocol's shutdown command stop the node (memcached's -A)", False, parse_bool, flag=True
    )
    drain_timeout: float = opt("longest a drain on SIGTERM may take, in seconds", 120.0, _bounded(float, 1))
    anti_entropy_interval: float = opt(
        "seconds between anti-entropy passes over the keys shared with other replicas (0: none)",
        60.0,
        _bounded(float, 0),
    )
    anti_entropy_rate: int = opt("records a second anti-entropy scans at most", 20_000, _bounded(int, 100, 10_000_000))
    log_format: str = opt("log lines: text, or json (one JSON object a line)", "text", parse_choice(*LOG_FORMATS))
    max_clock_skew: float = opt(
        "refuse a version from the wire whose clock is more than this many seconds ahead of this node's",
        300.0,
        _bounded(float, 1, 86400),
    )
    latency_histograms: bool = opt(
        "time every request into /metrics' latency histograms and count error replies (off: neither)",
        True,
        parse_bool,
    )
    handoff_rate: Rate = opt(
        "most a handoff sends a second, over every target: records (5000), value bytes (20MiB), both (5000,20MiB),"
        " or unlimited",
        Rate(),
        Rate.parse,
        metavar="RATE",
    )
    config: str | None = opt("YAML file with options (keys as the long flags)", None, parse_path)

    @property
    def engine_kind(self) -> str:
        """The engine this node runs: ``--engine``, else sqlite with ``--data-dir``, else memory."""
        return self.engine or ("sqlite" if self.data_dir else "memory")

    def __post_init__(self) -> None:
        kind = self.engine_kind
        if self.memory_limit and kind != "memory":
            raise ConfigError(f"option --memory-limit: applies to the memory engine, and this node runs {kind}")
        if self.memory_full != "evict" and not self.memory_limit:
            raise ConfigError("option --memory-full: needs --memory-limit (there is no limit to be full at)")
        if self.disk_limit and kind != "sqlite":
            raise ConfigError(f"option --disk-limit: applies to the sqlite engine, and this node runs {kind}")


@dataclass(frozen=True)
class GatewayConfig:
    """The gateway role's options."""

    gateway_id: str = opt("unique id of this gateway", parse=parse_node_id, env=["GATEWAY_ID"], required=True)
    port: str = opt("HTTP API: a port or an endpoint string", "tcp:8000", parse_endpoint, ["LISTEN_PORT"])
    line_port: str = opt("memcached line protocol: a port or an endpoint string", "tcp:11211", parse_endpoint)
    raft_port: int = opt("Raft port (pysyncobj)", 8001, parse_port, ["RAFT_PORT"])
    peers: tuple[str, ...] = opt(
        "the other gateways' Raft addresses, host:port, comma- or space-separated",
        (),
        parse_host_ports,
        ["PEER_GATEWAYS"],
    )
    advertise_host: str = opt("host or address the other gateways reach this one at", "127.0.0.1", parse_host)
    data_dir: str | None = opt("directory for the Raft journal and snapshot (none: memory only)", None, parse_path)
    raft_password: str | None = opt(
        "authenticates and encrypts Raft traffic; required (loopback too)", None, parse_secret, secret=True
    )
    raft_password_file: str | None = opt("file holding --raft-password (its first line)", None, parse_path)
    token: str | None = opt("cluster token: guards the admin routes (SECURITY.md)", None, parse_secret, secret=True)
    token_file: str | None = opt("file holding --token (its first line)", None, parse_path)
    tls_ca: str | None = opt(_TLS_CA_HELP, None, parse_path)
    replicas: int = opt("replication factor N (capped at the number of nodes)", 3, _bounded(int, 1, 16))
    write_quorum: int = opt("write quorum W", 2, _bounded(int, 1, 16))
    read_quorum: int = opt("read quorum R", 2, _bounded(int, 1, 16))
    probe_interval: float = opt("seconds between health probes of each kvstore", 1.0, _bounded(float, 0.05))
    down_after: int = opt("failed probes before a node is marked down", 3, _bounded(int, 1))
    dead_after: float = opt("seconds down before a node is removed from the ring", 60.0, _bounded(float, 0))
    points_per_node: int = opt("ring points per node at equal weights (multiple of 4)", 160, _bounded(int, 4, 4096))
    allow_flush_all: bool = opt("let flush_all reach every kvstore", False, parse_bool, flag=True)
    max_value_size: int = opt("largest value in bytes", 1024 * 1024, _bounded(int, 1, 128 * 1024 * 1024))
    max_connections: int = opt(_MAX_CONNECTIONS_HELP, 1024, _bounded(int, 1))
    max_keys: int = opt("most keys in one multi-key get (line protocol)", 2048, _bounded(int, 1, 65536))
    idle_timeout: float = opt("close a client connection idle this many seconds (0: never)", 600.0, _bounded(float, 0))
    client_timeout: float = opt(_CLIENT_TIMEOUT_HELP, 30.0, _bounded(float, 0))
    max_pending_bytes: int = opt(_PENDING_BYTES_HELP, 1024 * 1024, _bounded(int, 65536))
    enable_shutdown: bool = opt(
        "let the line protocol's shutdown command stop the gateway (memcached's -A)", False, parse_bool, flag=True
    )
    request_timeout: float = opt("seconds a gateway waits for a kvstore's answer", 5.0, _bounded(float, 0.01))
    log_format: str = opt("log lines: text, or json (one JSON object a line)", "text", parse_choice(*LOG_FORMATS))
    latency_histograms: bool = opt(
        "time every request into /metrics' latency histograms and count error replies (off: neither)",
        True,
        parse_bool,
    )
    hedge_after: float = opt(
        "seconds a read waits for a kvstore before it also asks the next replica (0: never)", 0.05, _bounded(float, 0)
    )
    primary_timeout: float = opt(
        "seconds a read-modify-write waits for the key's primary before the next replica takes over"
        " (0: until the request timeout)",
        0.5,
        _bounded(float, 0),
    )
    workers: int = opt(
        "worker processes serving the line and HTTP ports (auto: one per CPU this process may use;"
        " 1: the main process serves them)",
        1,
        parse_workers,
    )
    follow: tuple[str, ...] = opt(
        "run no Raft: follow the cluster map of these gateways (URLs or host:port, comma-separated) and serve keys",
        (),
        parse_gateways,
    )
    config: str | None = opt("YAML file with options (keys as the long flags)", None, parse_path)

    def __post_init__(self) -> None:
        if self.points_per_node % 4:
            raise ConfigError(f"option --points-per-node: {self.points_per_node} is not a multiple of 4")
        if self.primary_timeout and self.primary_timeout >= self.request_timeout:
            raise ConfigError(
                f"option --primary-timeout: {self.primary_timeout:g} is not shorter than"
                f" --request-timeout {self.request_timeout:g}"
            )
        if self.workers > 1:
            for flag, description in (("--port", self.port), ("--line-port", self.line_port)):
                if description.partition(":")[0] not in ("tcp", "tcp6", "unix"):
                    raise ConfigError(
                        f"option --workers: {flag} {description} is not a tcp:, tcp6: or unix: endpoint, and only"
                        " those are handed over to workers (terminate TLS in front of the gateway, or run one process)"
                    )
        for name in ("write_quorum", "read_quorum"):
            if getattr(self, name) > self.replicas:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"option {flag}: {getattr(self, name)} is larger than --replicas {self.replicas}")


# -- loading ---------------------------------------------------------------------------------------


def _read_yaml(path: str, source: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"option --config: cannot read {path!r} (from {source}): {e.strerror}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"option --config: {path!r} (from {source}) is not valid YAML{at}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"option --config: {path!r} (from {source}) must hold a mapping of option names to values")
    return data


def load_config(
    config_class: type[C],
    cli: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> C:
    """Build a config: command line (``cli``: option name to the raw value), environment, YAML, defaults.

    A secret (``--token``) may also come from a file (``--token-file``): the two count as one option, so
    the one from the first place wins (``--token-file`` on the command line over ``$CHASHD_TOKEN``), and
    both from the same place is an error.
    """
    cli = dict(cli or {})
    environ = os.environ if environ is None else environ
    specs = {spec.name: spec for spec in option_specs(config_class)}
    unknown = set(cli) - set(specs)
    if unknown:
        raise ConfigError(f"unknown option {sorted(unknown)[0]!r}")

    raw: dict[str, tuple[object, str, int]] = {}  # name: (value, where it came from, rank of that place)
    for spec in specs.values():
        if spec.name in cli and cli[spec.name] is not None:
            raw[spec.name] = (cli[spec.name], f"command line {spec.cli}", 0)
            continue
        for var in spec.env:
            if var in environ and environ[var] != "":
                raw[spec.name] = (environ[var], f"environment variable {var}", 1)
                break

    if "config" in raw:
        path_raw, path_source, _ = raw["config"]
        path = _parse_one(specs["config"], path_raw, path_source)
        for key, value in _read_yaml(path, path_source).items():
            name = str(key).replace("-", "_")
            if name not in specs or name == "config":
                raise ConfigError(f"unknown option {key!r} in config file {path!r}")
            raw.setdefault(name, (value, f"config file {path!r}, key {key!r}", 2))

    for spec in specs.values():
        if spec.secret and spec.name + "_file" in specs:
            _secret_from_file(spec, specs[spec.name + "_file"], raw)

    values: dict[str, Any] = {}
    for spec in specs.values():
        if spec.name in raw:
            value, source, _ = raw[spec.name]
            if value is None:
                continue
            values[spec.name] = _parse_one(spec, value, source)
        elif spec.required:
            names = " or ".join([spec.cli] + [f"${v}" for v in spec.env])
            raise ConfigError(f"option {spec.cli} is required: give {names}")
    try:
        return config_class(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # pragma: no cover - __post_init__ checks raise ConfigError
        raise ConfigError(str(e)) from None


def _secret_from_file(spec: OptionSpec, file_spec: OptionSpec, raw: dict[str, tuple[object, str, int]]) -> None:
    """Put the secret of ``spec`` read from the file of ``file_spec`` into ``raw``, when the file is the
    secret's first place (see ``load_config``)."""
    if file_spec.name not in raw:
        return
    path_raw, path_source, path_rank = raw[file_spec.name]
    if spec.name in raw:
        _, source, rank = raw[spec.name]
        if rank == path_rank:
            raise ConfigError(
                f"option {spec.cli} ({source}) and {file_spec.cli} ({path_source}) are both given; give one"
            )
        if rank < path_rank:
            return
    path = _parse_one(file_spec, path_raw, path_source)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ConfigError(f"option {file_spec.cli}: cannot read {path!r} (from {path_source}): {reason}") from None
    if not text:
        raise ConfigError(f"option {file_spec.cli}: {path!r} (from {path_source}) is empty")
    raw[spec.name] = (text, f"file {path!r} of {file_spec.cli}", path_rank)


def _parse_one(spec: OptionSpec, value: object, source: str) -> Any:
    try:
        return spec.parse(value)
    except ValueError as e:
        raise ConfigError(f"option {spec.cli}: {e} (from {source})") from None


# -- who may reach what -------------------------------------------------------------------------------


def listens_beyond_loopback(description: str) -> bool:
    """True unless a server endpoint string listens on a loopback address only, or on a UNIX socket.

    A bare port (``tcp:8000``) listens on every interface; ``tcp:8000:interface=127.0.0.1`` (or ``::1``,
    ``localhost``) on loopback only; a ``systemd:`` socket is taken as reachable from anywhere.
    """
    kind, positional, named = _endpoint_args(description)
    if kind == "unix":
        return False
    if kind not in ("tcp", "tcp6", "ssl"):
        return True
    interface = named.get("interface", positional[1] if kind != "ssl" and len(positional) > 1 else "")
    return not _is_loopback_host(interface)


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def connection_limits(config: GatewayConfig | KVStoreConfig) -> dict[str, Any]:
    """The limits every client listener of a daemon takes (the line factory's and the HTTP site's keywords)."""
    return {
        "max_connections": config.max_connections,
        "idle_timeout": config.idle_timeout,
        "client_timeout": config.client_timeout,
    }


def check_secrets(config: GatewayConfig | KVStoreConfig) -> None:
    """Refuse, with one line, a daemon that would run without the secret one of its surfaces needs.

    A gateway always needs a Raft password: pysyncobj unpickles what reaches its Raft port unless a
    password authenticates each message first, and a local user can reach a loopback port too. The cluster
    token guards the internal surfaces: a gateway's admin routes (a gateway that follows another's map with
    ``--follow`` has neither Raft nor admin routes) (on ``--port``), a kvstore's writes and
    internal commands (on ``--port`` and ``--line-port``); a daemon whose such port listens beyond loopback
    needs one.
    """
    if isinstance(config, GatewayConfig):
        if config.follow:
            return  # no Raft port, no admin routes; the token, when the cluster has one, reads the routing
        if not config.raft_password:
            raise ConfigError(
                "option --raft-password is required: without it anyone who reaches the Raft port (loopback "
                "included) can run code in the gateway; give --raft-password-file, --raft-password or "
                "$CHASHD_RAFT_PASSWORD (e.g. openssl rand -hex 32, the same on every gateway)"
            )
        internal = [("--port", config.port, "the admin routes")]
    else:
        internal = [("--port", config.port, "writes"), ("--line-port", config.line_port, "internal commands")]
    if config.token:
        return
    for flag, description, what in internal:
        if listens_beyond_loopback(description):
            raise ConfigError(
                f"option --token is required: {flag} {description} listens beyond loopback and serves {what}; "
                "give --token-file, --token or $CHASHD_TOKEN (the cluster's token), or listen on loopback "
                "(interface=127.0.0.1)"
            )


def describe(config: object) -> dict[str, Any]:
    """The config as a dict for logs, with secrets hidden."""
    result = {}
    for spec in option_specs(type(config)):
        value = getattr(config, spec.name)
        result[spec.name] = "***" if spec.secret and value else value
    return result


# -- twistd options --------------------------------------------------------------------------------


class ConfigOptions(usage.Options):
    """twistd options that load a config after parsing: ``options.config``."""

    config: Any = None


def options_for(config_class: type[C], command: str) -> type[ConfigOptions]:
    """A ``usage.Options`` class for twistd that parses flags and then loads ``config_class``.

    After parsing, ``options.config`` holds the loaded config. Any error, an unknown flag included,
    ends the process with one line on stderr and exit status 1, before anything binds a port.
    """
    specs = option_specs(config_class)
    parameters = []
    flags = []
    for spec in specs:
        env = ", ".join("$" + v for v in spec.env)
        default = "" if spec.default in (None, (), False) else f" (default: {_show(spec.default)})"
        doc = f"{spec.help}{default} [{env}]"
        if spec.flag:
            flags.append([spec.cli[2:], None, doc])
        else:
            parameters.append([spec.cli[2:], None, None, doc])

    class Options(ConfigOptions):
        optParameters = parameters
        optFlags = flags
        longdesc = (
            "Each option may also come from the environment variables shown, or from the YAML file given "
            "with --config; the command line wins, then the environment, then the file, then the default."
        )

        def parseOptions(self, options: list[str] | None = None) -> None:
            try:
                super().parseOptions(options)
            except usage.UsageError as e:
                raise SystemExit(f"{command}: error: {e} (see twistd {command} --help)") from None
            except ConfigError as e:
                raise SystemExit(f"{command}: error: {e}") from None

        def postOptions(self) -> None:
            given: dict[str, Any] = {}
            for spec in specs:
                value = self.opts.get(spec.cli[2:])
                if spec.flag:
                    if value:
                        given[spec.name] = True
                elif value is not None:
                    given[spec.name] = value
            self.config = load_config(config_class, given)

    Options.__name__ = f"{config_class.__name__.replace('Config', '')}Options"
    return Options


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)
