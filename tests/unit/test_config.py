"""Configuration: command line, then environment, then YAML, then defaults; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from chashd.config import (
    ConfigError,
    GatewayConfig,
    KVStoreConfig,
    check_secrets,
    describe,
    endpoint_port,
    listens_beyond_loopback,
    load_config,
    option_specs,
    options_for,
    parse_endpoint,
)


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "chashd.yaml"
    path.write_text(text)
    return str(path)


class PrecedenceTests:
    """Where each value comes from."""

    def test_defaults(self) -> None:
        """With only the required id, every other option has its default."""
        config = load_config(GatewayConfig, {"gateway_id": "g1"}, environ={})
        assert (config.port, config.raft_port, config.line_port) == ("tcp:8000", 8001, "tcp:11211")
        assert (config.replicas, config.write_quorum, config.read_quorum) == (3, 2, 2)
        kv = load_config(KVStoreConfig, {"node_id": "a"}, environ={})
        assert (kv.port, kv.line_port, kv.gateway) == ("tcp:8080", "tcp:11212", ())

    def test_seed_environment(self) -> None:
        """The short variable names (GATEWAY_ID, ...) work as written."""
        env = {
            "GATEWAY_ID": "gateway-1",
            "LISTEN_PORT": "9000",
            "RAFT_PORT": "9001",
            "PEER_GATEWAYS": "gw-2:8001 gw-3:8001",
        }
        config = load_config(GatewayConfig, {}, environ=env)
        assert config.gateway_id == "gateway-1"
        assert config.port == "tcp:9000"
        assert config.raft_port == 9001
        assert config.peers == ("gw-2:8001", "gw-3:8001")
        kv = load_config(
            KVStoreConfig,
            {},
            environ={"NODE_ID": "kvstore-A", "LISTEN_PORT": "8081", "GATEWAY_ADDRESS": "localhost:8000"},
        )
        assert (kv.node_id, kv.port, kv.gateway) == ("kvstore-A", "tcp:8081", ("http://localhost:8000",))

    def test_chashd_variables(self) -> None:
        """Every option has a CHASHD_ variable."""
        config = load_config(GatewayConfig, {}, environ={"CHASHD_GATEWAY_ID": "g", "CHASHD_REPLICAS": "5"})
        assert (config.gateway_id, config.replicas) == ("g", 5)
        for spec in option_specs(GatewayConfig) + option_specs(KVStoreConfig):
            assert "CHASHD_" + spec.name.upper() in spec.env

    def test_order(self, tmp_path: Path) -> None:
        """The command line beats the environment, which beats the file, which beats the default."""
        path = _yaml(tmp_path, "gateway-id: from-file\nraft_port: 7001\nreplicas: 4\nwrite-quorum: 3\n")
        env = {"CHASHD_CONFIG": path, "RAFT_PORT": "7002", "GATEWAY_ID": "from-env"}
        config = load_config(GatewayConfig, {"gateway_id": "from-cli"}, environ=env)
        assert config.gateway_id == "from-cli"
        assert config.raft_port == 7002
        assert config.replicas == 4 and config.write_quorum == 3
        assert config.read_quorum == 2

    def test_peers_separators(self) -> None:
        """Peers are comma- or space-separated, or a YAML list."""
        for raw in ("a:1,b:2", "a:1 b:2", " a:1 ,  b:2 ", ["a:1", "b:2"]):
            config = load_config(GatewayConfig, {"gateway_id": "g", "peers": raw}, environ={})
            assert config.peers == ("a:1", "b:2")

    def test_empty_variable_is_unset(self) -> None:
        """An empty environment variable counts as not given."""
        config = load_config(GatewayConfig, {"gateway_id": "g"}, environ={"LISTEN_PORT": ""})
        assert config.port == "tcp:8000"


class EndpointTests:
    """--port and --line-port take a port or an endpoint string."""

    def test_forms(self) -> None:
        """A bare port becomes tcp:PORT; endpoint strings pass unchanged."""
        assert parse_endpoint("8000") == "tcp:8000"
        assert parse_endpoint(8000) == "tcp:8000"
        assert parse_endpoint("tcp:8000:interface=127.0.0.1") == "tcp:8000:interface=127.0.0.1"
        assert parse_endpoint("tcp:port=8000") == "tcp:port=8000"
        assert parse_endpoint("unix:/run/chashd.sock") == "unix:/run/chashd.sock"

    def test_port_of(self) -> None:
        """The port number is read from an endpoint string."""
        assert endpoint_port("tcp:8000:interface=127.0.0.1") == 8000
        assert endpoint_port("tcp6:port=9:interface=\\:\\:1") == 9
        assert endpoint_port("unix:/x") is None

    @pytest.mark.parametrize("bad", ["abc", "65536", "-1", "tcp:", "tcp:x", "udp:53", "tcp:99999", ""])
    def test_rejects(self, bad: str) -> None:
        """Anything else is refused."""
        with pytest.raises(ValueError):
            parse_endpoint(bad)


class SecretTests:
    """--raft-password and --token, or a file holding each (--raft-password-file, --token-file)."""

    def _secret(self, tmp_path: Path, text: str, name: str = "secret") -> str:
        path = tmp_path / name
        path.write_text(text)
        path.chmod(0o600)
        return str(path)

    def test_from_file(self, tmp_path: Path) -> None:
        """The file's first line, without blanks around it, is the secret; the file option keeps its path."""
        path = self._secret(tmp_path, "  s3cret-raft \nignored\n")
        config = load_config(GatewayConfig, {"gateway_id": "g", "raft_password_file": path}, environ={})
        assert config.raft_password == "s3cret-raft" and config.raft_password_file == path

    def test_file_from_environment_and_yaml(self, tmp_path: Path) -> None:
        """CHASHD_TOKEN_FILE and the YAML key token-file work like the flag."""
        path = self._secret(tmp_path, "tok-1\n")
        env = {"CHASHD_TOKEN_FILE": path}
        assert load_config(KVStoreConfig, {"node_id": "a"}, environ=env).token == "tok-1"
        yaml_path = _yaml(tmp_path, f"token-file: {path}\n")
        assert load_config(KVStoreConfig, {"node_id": "a", "config": yaml_path}, environ={}).token == "tok-1"

    def test_first_place_wins(self, tmp_path: Path) -> None:
        """A secret and its file are one option: the command line wins over the environment either way round."""
        path = self._secret(tmp_path, "from-file\n")
        config = load_config(KVStoreConfig, {"node_id": "a", "token_file": path}, environ={"CHASHD_TOKEN": "env"})
        assert config.token == "from-file"
        config = load_config(KVStoreConfig, {"node_id": "a", "token": "cli"}, environ={"CHASHD_TOKEN_FILE": path})
        assert config.token == "cli"

    def test_both_in_one_place(self, tmp_path: Path) -> None:
        """--token and --token-file on one command line: one line naming both, never the secret."""
        path = self._secret(tmp_path, "from-file\n")
        with pytest.raises(ConfigError) as info:
            load_config(KVStoreConfig, {"node_id": "a", "token_file": path, "token": "hunter2"}, environ={})
        message = str(info.value)
        assert "--token " in message and "--token-file" in message and "hunter2" not in message

    @pytest.mark.parametrize(("text", "problem"), [("", "is empty"), ("\n\n", "is empty"), (None, "cannot read")])
    def test_bad_file(self, tmp_path: Path, text: str | None, problem: str) -> None:
        """An empty or missing file is refused by the file option's name."""
        path = self._secret(tmp_path, text) if text is not None else str(tmp_path / "missing")
        with pytest.raises(ConfigError, match=f"--raft-password-file: .*{problem}"):
            load_config(GatewayConfig, {"gateway_id": "g", "raft_password_file": path}, environ={})

    def test_blank_secret_refused(self) -> None:
        """A blank secret is no secret."""
        with pytest.raises(ConfigError, match="--token: the secret is empty"):
            load_config(KVStoreConfig, {"node_id": "a"}, environ={"CHASHD_TOKEN": "   "})

    def test_hidden_in_logs(self) -> None:
        """describe() shows *** for the secrets."""
        config = load_config(GatewayConfig, {"gateway_id": "g", "raft_password": "pw", "token": "tk"}, environ={})
        shown = describe(config)
        assert shown["raft_password"] == shown["token"] == "***"


class ExposureTests:
    """check_secrets: what a daemon refuses to start without."""

    @pytest.mark.parametrize(
        ("description", "beyond"),
        [
            ("tcp:8000", True),
            ("tcp:8000:interface=0.0.0.0", True),
            ("tcp6:8000:interface=\\:\\:", True),
            ("tcp:8000:interface=10.1.2.3", True),
            ("ssl:8443:privateKey=k.pem", True),
            ("systemd:domain=INET:index=0", True),
            ("tcp:8000:interface=127.0.0.1", False),
            ("tcp:8000:127.0.0.2", False),
            ("tcp6:port=8000:interface=\\:\\:1", False),
            ("ssl:8443:privateKey=k.pem:interface=localhost", False),
            ("unix:/run/chashd/kv.sock", False),
        ],
    )
    def test_listens_beyond_loopback(self, description: str, beyond: bool) -> None:
        """A bare port listens everywhere; an interface on loopback, or a UNIX socket, does not."""
        assert listens_beyond_loopback(description) is beyond

    def _gateway(self, **cli: str) -> GatewayConfig:
        return load_config(GatewayConfig, {"gateway_id": "g", **cli}, environ={})

    def test_raft_password_always(self) -> None:
        """A gateway needs a Raft password even with everything on loopback."""
        loopback = {"port": "tcp:8000:interface=127.0.0.1", "peers": "127.0.0.1:8002"}
        with pytest.raises(ConfigError, match="^option --raft-password is required: .*loopback included"):
            check_secrets(self._gateway(**loopback))
        check_secrets(self._gateway(**loopback, raft_password="pw"))

    def test_gateway_admin_routes(self) -> None:
        """A gateway's HTTP port (its admin routes) beyond loopback needs the token; the line port does not."""
        with pytest.raises(ConfigError, match="^option --token is required: --port tcp:8000 listens beyond"):
            check_secrets(self._gateway(raft_password="pw"))
        check_secrets(self._gateway(raft_password="pw", token="tk"))
        check_secrets(self._gateway(raft_password="pw", port="tcp6:8000:interface=\\:\\:1", line_port="11211"))

    @pytest.mark.parametrize("flag", ["port", "line_port"])
    def test_kvstore_ports(self, flag: str) -> None:
        """Either kvstore port beyond loopback needs the token."""
        loopback = {"port": "tcp:8080:interface=127.0.0.1", "line_port": "tcp:11212:interface=127.0.0.1"}
        config = load_config(KVStoreConfig, {"node_id": "a", **loopback, flag: "9000"}, environ={})
        with pytest.raises(ConfigError, match=f"--token is required: --{flag.replace('_', '-')} tcp:9000"):
            check_secrets(config)
        check_secrets(load_config(KVStoreConfig, {"node_id": "a", **loopback}, environ={}))
        check_secrets(load_config(KVStoreConfig, {"node_id": "a", flag: "9000", "token": "tk"}, environ={}))


class ErrorTests:
    """A bad value is one line naming the option and its source."""

    def _error(self, config_class: type, cli: dict[str, object], env: dict[str, str]) -> str:
        with pytest.raises(ConfigError) as info:
            load_config(config_class, cli, environ=env)
        message = str(info.value)
        assert "\n" not in message
        return message

    def test_bad_port_from_environment(self) -> None:
        """The message names the option and the variable."""
        message = self._error(GatewayConfig, {"gateway_id": "g"}, {"LISTEN_PORT": "eighty"})
        assert "--port" in message and "LISTEN_PORT" in message and "'eighty'" in message

    def test_bad_port_from_command_line(self) -> None:
        """The message names the flag."""
        message = self._error(GatewayConfig, {"gateway_id": "g", "raft_port": "70000"}, {})
        assert "--raft-port" in message and "command line" in message

    def test_bad_value_from_file(self, tmp_path: Path) -> None:
        """The message names the file and key."""
        path = _yaml(tmp_path, "replicas: many\n")
        message = self._error(GatewayConfig, {"gateway_id": "g", "config": path}, {})
        assert "--replicas" in message and "chashd.yaml" in message and "'replicas'" in message

    def test_unparsable_yaml(self, tmp_path: Path) -> None:
        """A YAML syntax error names the file and the line."""
        path = _yaml(tmp_path, "replicas: [3\nport: 1\n")
        message = self._error(GatewayConfig, {"gateway_id": "g", "config": path}, {})
        assert "--config" in message and "not valid YAML" in message and "line" in message

    def test_yaml_not_a_mapping(self, tmp_path: Path) -> None:
        """A file that is not a mapping is refused."""
        path = _yaml(tmp_path, "- a\n- b\n")
        assert "mapping" in self._error(GatewayConfig, {"gateway_id": "g", "config": path}, {})

    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing file is an error, not an empty config."""
        message = self._error(GatewayConfig, {"gateway_id": "g", "config": str(tmp_path / "nope.yaml")}, {})
        assert "cannot read" in message

    def test_unknown_yaml_key(self, tmp_path: Path) -> None:
        """A misspelled key in the file is refused by name."""
        path = _yaml(tmp_path, "replcas: 3\n")
        assert "'replcas'" in self._error(GatewayConfig, {"gateway_id": "g", "config": path}, {})

    def test_missing_id(self) -> None:
        """The id is required, and the message says how to give it."""
        message = self._error(KVStoreConfig, {}, {})
        assert "--node-id" in message and "NODE_ID" in message

    def test_bad_id(self) -> None:
        """Ids are restricted to a safe alphabet."""
        assert "--node-id" in self._error(KVStoreConfig, {"node_id": "a b"}, {})

    def test_quorum_larger_than_replicas(self) -> None:
        """W and R cannot exceed N."""
        message = self._error(GatewayConfig, {"gateway_id": "g", "replicas": "1"}, {})
        assert "--write-quorum" in message

    def test_primary_timeout_shorter_than_the_request_timeout(self) -> None:
        """--primary-timeout must be shorter than --request-timeout (0 turns the failover off)."""
        message = self._error(GatewayConfig, {"gateway_id": "g", "primary_timeout": "5", "request_timeout": "5"}, {})
        assert "--primary-timeout" in message and "--request-timeout" in message
        config = load_config(GatewayConfig, {"gateway_id": "g", "primary_timeout": "0", "hedge_after": "0"}, {})
        assert (config.primary_timeout, config.hedge_after) == (0.0, 0.0)

    def test_storage_limits(self) -> None:
        """--memory-limit and --memory-full bound the memory engine, --disk-limit the SQLite engine; each is
        refused, naming itself, on the other engine."""
        kv = load_config(KVStoreConfig, {"node_id": "a", "memory_limit": "64", "memory_full": "error"}, environ={})
        assert (kv.memory_limit, kv.memory_full, kv.engine_kind) == (64, "error", "memory")
        kv = load_config(KVStoreConfig, {"node_id": "a", "data_dir": "/d", "disk_limit": "100"}, environ={})
        assert (kv.disk_limit, kv.engine_kind) == (100, "sqlite")
        assert "--memory-limit" in self._error(
            KVStoreConfig, {"node_id": "a", "data_dir": "/d", "memory_limit": "8"}, {}
        )
        assert "--disk-limit" in self._error(KVStoreConfig, {"node_id": "a", "disk_limit": "8"}, {})
        assert "--memory-full" in self._error(KVStoreConfig, {"node_id": "a", "memory_full": "error"}, {})
        assert "--memory-full" in self._error(KVStoreConfig, {"node_id": "a", "memory_full": "lru"}, {})
        assert "--memory-limit" in self._error(KVStoreConfig, {"node_id": "a", "memory_limit": "-1"}, {})
        assert "--max-keys" in self._error(GatewayConfig, {"gateway_id": "g", "max_keys": "0"}, {})

    def test_bad_peer(self) -> None:
        """Each peer must be host:port."""
        assert "--peers" in self._error(GatewayConfig, {"gateway_id": "g", "peers": "a:1,b"}, {"X": "1"})

    def test_bad_boolean(self) -> None:
        """Booleans accept the usual words only."""
        assert "--allow-flush-all" in self._error(
            GatewayConfig, {"gateway_id": "g"}, {"CHASHD_ALLOW_FLUSH_ALL": "maybe"}
        )


class OptionsTests:
    """The twistd options class."""

    def test_parses_into_config(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Flags reach the config; flags without a value are booleans."""
        monkeypatch.delenv("LISTEN_PORT", raising=False)
        options = options_for(GatewayConfig, "chash-gateway")()
        options.parseOptions(["--gateway-id", "g1", "--port", "tcp:0:interface=127.0.0.1", "--allow-flush-all"])
        assert options.config.gateway_id == "g1"
        assert options.config.port == "tcp:0:interface=127.0.0.1"
        assert options.config.allow_flush_all is True

    def test_errors_exit_with_one_line(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An unknown flag or a bad value ends with one line and a non-zero status."""
        monkeypatch.delenv("GATEWAY_ID", raising=False)
        for argv in (["--gateway-id", "g", "--bogus", "1"], ["--gateway-id", "g", "--port", "x"], []):
            options = options_for(GatewayConfig, "chash-gateway")()
            with pytest.raises(SystemExit) as info:
                options.parseOptions(argv)
            assert isinstance(info.value.code, str)
            assert info.value.code.startswith("chash-gateway: error: ")
            assert "\n" not in info.value.code

    def test_help_lists_variables(self) -> None:
        """--help shows each option with its environment variables."""
        text = str(options_for(KVStoreConfig, "chash-kvstore")())
        assert "--node-id" in text and "NODE_ID" in text and "GATEWAY_ADDRESS" in text


class WorkersAndFollowTests:
    """--workers and --follow."""

    def _gateway(self, **cli: str) -> GatewayConfig:
        return load_config(GatewayConfig, {"gateway_id": "g", **cli}, environ={})

    def test_workers(self) -> None:
        """A count from 1 to 256, or auto: the CPUs this process may run on."""
        import os

        assert self._gateway().workers == 1
        assert self._gateway(workers="4").workers == 4
        assert self._gateway(workers="auto").workers == len(os.sched_getaffinity(0))
        for bad in ("0", "300", "many"):
            with pytest.raises(ConfigError, match="^option --workers"):
                self._gateway(workers=bad)

    def test_workers_need_plain_endpoints(self) -> None:
        """Connections are handed to workers as they are: a TLS endpoint with workers is refused."""
        self._gateway(workers="2", port="unix:/run/chashd/gw.sock", line_port="tcp6:11211")
        with pytest.raises(ConfigError, match="^option --workers: --port ssl:8443"):
            self._gateway(workers="2", port="ssl:8443:privateKey=k.pem")

    def test_follower_needs_no_raft_secret(self) -> None:
        """A follower has no Raft port and no admin routes: neither secret is required; URLs are normalized."""
        config = self._gateway(follow="gw1:8000, https://gw2:8443/")
        assert config.follow == ("http://gw1:8000", "https://gw2:8443")
        check_secrets(config)
