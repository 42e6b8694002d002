"""docker-compose.yml, parsed (no engine here): services, ports, volumes, environment, healthchecks, start order."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from chashd.config import ConfigError, GatewayConfig, KVStoreConfig, check_secrets, load_config, option_specs
from tests.deploy.conftest import ROOT

GATEWAYS = ("gateway-1", "gateway-2", "gateway-3")
KVSTORES = ("kvstore-a", "kvstore-b", "kvstore-c")
#: What the test puts in the Compose secrets' files (the real ones are random, made by build.sh).
SECRETS = {"raft-password": "raft-secret", "token": "token-secret"}


def interpolate(value: Any, environ: dict[str, str]) -> Any:
    """Compose's variable interpolation (``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``), applied throughout."""
    if isinstance(value, dict):
        return {k: interpolate(v, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, environ) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        current = environ.get(name, "")
        if op == ":-":
            return current or arg
        if op == ":?" and not current:
            raise LookupError(f"{name}: {arg}")
        return current

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}", one, value)


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    """The file as YAML (anchors and merge keys resolved)."""
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


@pytest.fixture(scope="module")
def services(raw: dict[str, Any]) -> dict[str, Any]:
    """The services, interpolated."""
    result: dict[str, Any] = interpolate(raw["services"], {})
    return result


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stand-ins for /run/secrets: a file per secret, holding SECRETS."""
    directory: Path = tmp_path_factory.mktemp("run-secrets")
    for name, value in SECRETS.items():
        (directory / name).write_text(value + "\n")
    return directory


def role(service: dict[str, Any]) -> str:
    """chash-gateway or chash-kvstore, from the command."""
    command = service["command"]
    assert command[:3] == ["twistd", "--nodaemon", "--pidfile="]
    return str(command[3])


def config_of(service: dict[str, Any], secrets_dir: Path | None = None) -> Any:
    """The service's configuration as its daemon's own loader reads it from the environment: the Compose
    secrets read from ``secrets_dir`` in place of /run/secrets, or left out without one."""
    environ = {k: str(v) for k, v in service["environment"].items()}
    if secrets_dir is None:
        environ = {k: v for k, v in environ.items() if not v.startswith("/run/secrets/")}
    else:
        environ = {k: v.replace("/run/secrets/", f"{secrets_dir}/") for k, v in environ.items()}
    config_class = GatewayConfig if role(service) == "chash-gateway" else KVStoreConfig
    return load_config(config_class, environ=environ)


class ServiceTests:
    """Three gateways and three kvstores from the one image."""

    def test_services(self, services: dict[str, Any]) -> None:
        """Exactly the six services, with the right role each."""
        assert set(services) == set(GATEWAYS) | set(KVSTORES)
        for name in GATEWAYS:
            assert role(services[name]) == "chash-gateway"
        for name in KVSTORES:
            assert role(services[name]) == "chash-kvstore"

    def test_one_image(self, raw: dict[str, Any], services: dict[str, Any]) -> None:
        """Every service runs the same image (chashd:latest unless CHASHD_IMAGE says otherwise), built from the root."""
        assert {s["image"] for s in services.values()} == {"chashd:latest"}
        assert {s["build"]["context"] for s in services.values()} == {"."}
        other = interpolate(raw["services"], {"CHASHD_IMAGE": "registry.example.com/chashd:v1"})
        assert {s["image"] for s in other.values()} == {"registry.example.com/chashd:v1"}

    def test_hardened(self, services: dict[str, Any]) -> None:
        """Read-only root with a /tmp tmpfs, no capabilities, no privilege escalation."""
        for service in services.values():
            assert service["read_only"] is True
            assert service["tmpfs"] == ["/tmp"]
            assert service["cap_drop"] == ["ALL"]
            assert "no-new-privileges:true" in service["security_opt"]


class EnvironmentTests:
    """The environment each daemon gets, read by its own config loader."""

    def test_gateways(self, services: dict[str, Any], secrets_dir: Path) -> None:
        """Each gateway is named after its service, advertises that name and has the two others as Raft peers;
        it reads the Raft password and the token from the Compose secrets, and would start (check_secrets)."""
        for name in GATEWAYS:
            config = config_of(services[name], secrets_dir)
            assert config.gateway_id == name and config.advertise_host == name
            others = {f"{g}:{config_of(services[g]).raft_port}" for g in GATEWAYS if g != name}
            assert set(config.peers) == others
            assert config.raft_password == "raft-secret" and config.token == "token-secret"
            assert config.port == "tcp:8000" and config.line_port == "tcp:11211"
            check_secrets(config)

    def test_kvstores(self, services: dict[str, Any], secrets_dir: Path) -> None:
        """Each kvstore is named after its service, advertises it, and registers with every gateway's HTTP port;
        it reads the token from the Compose secret, and would start (check_secrets)."""
        gateways = {f"http://{g}:{config_of(services[g]).port.split(':')[1]}" for g in GATEWAYS}
        for name in KVSTORES:
            config = config_of(services[name], secrets_dir)
            assert config.node_id == name and config.advertise_host == name
            assert set(config.gateway) == gateways
            assert config.token == "token-secret" and config.engine == "sqlite"
            check_secrets(config)

    def test_seed_variables(self, services: dict[str, Any]) -> None:
        """The short variable names are used (GATEWAY_ID, LISTEN_PORT, RAFT_PORT, PEER_GATEWAYS, NODE_ID, ...)."""
        gateway_env = set(services["gateway-1"]["environment"])
        kvstore_env = set(services["kvstore-a"]["environment"])
        assert {"GATEWAY_ID", "LISTEN_PORT", "RAFT_PORT", "PEER_GATEWAYS"} <= gateway_env
        assert {"NODE_ID", "LISTEN_PORT", "GATEWAY_ADDRESS"} <= kvstore_env

    def test_known_options(self, services: dict[str, Any]) -> None:
        """No variable is a misspelled option: every one is read by the service's role."""
        for service in services.values():
            config_class = GatewayConfig if role(service) == "chash-gateway" else KVStoreConfig
            known = {var for spec in option_specs(config_class) for var in spec.env}
            assert set(service["environment"]) <= known

    def test_secrets_from_files(self, raw: dict[str, Any], services: dict[str, Any]) -> None:
        """No secret is written in the file: each service mounts the Compose secrets its *_FILE variables
        name, and those are files under .secrets/ (random, made by build.sh, git-ignored)."""
        assert {k: v["file"] for k, v in raw["secrets"].items()} == {
            "raft-password": ".secrets/raft-password",
            "token": ".secrets/token",
        }
        for service in services.values():
            environment = service["environment"]
            assert not {"CHASHD_RAFT_PASSWORD", "CHASHD_TOKEN"} & set(environment)
            named = {v.removeprefix("/run/secrets/") for k, v in environment.items() if k.endswith("_FILE")}
            assert named == set(service["secrets"])
            assert ("raft-password" in named) == (role(service) == "chash-gateway") and "token" in named

    def test_loader_rejects_bad_value(self, services: dict[str, Any]) -> None:
        """The loader used above does check values (so the environment tests can fail)."""
        broken = {**services["gateway-1"], "environment": {**services["gateway-1"]["environment"], "RAFT_PORT": "x"}}
        with pytest.raises(ConfigError):
            config_of(broken)


class PortAndVolumeTests:
    """What is published, and where the state lives."""

    def test_published_ports(self, services: dict[str, Any]) -> None:
        """Only gateway-1 publishes, its HTTP and line ports, on the same host ports."""
        published = {name: s.get("ports", []) for name, s in services.items() if s.get("ports")}
        assert published == {"gateway-1": ["8000:8000", "11211:11211"]}
        config = config_of(services["gateway-1"])
        assert {config.port, config.line_port} == {"tcp:8000", "tcp:11211"}

    def test_named_volumes(self, raw: dict[str, Any], services: dict[str, Any]) -> None:
        """Each service keeps its data directory in a named volume of its own."""
        seen = set()
        for service in services.values():
            (volume,) = service["volumes"]
            source, target = volume.split(":")
            assert source in raw["volumes"], f"{source} is not a named volume"
            assert target == config_of(service).data_dir == "/var/lib/chashd"
            seen.add(source)
        assert len(seen) == len(services)


class HealthTests:
    """Healthchecks and start order."""

    def test_healthchecks(self, services: dict[str, Any]) -> None:
        """Every service is checked by the image's health check script, which reads LISTEN_PORT."""
        dockerfile = (ROOT / "Dockerfile").read_text()
        assert "/usr/local/bin/chashd-healthcheck" in dockerfile
        for service in services.values():
            check = service["healthcheck"]
            assert check["test"] == ["CMD", "chashd-healthcheck"]
            assert "LISTEN_PORT" in service["environment"]
            assert check["retries"] >= 1 and check["start_period"]

    def test_kvstores_after_gateways(self, services: dict[str, Any]) -> None:
        """Every kvstore starts once every gateway is healthy; gateways wait for nothing."""
        for name in KVSTORES:
            assert services[name]["depends_on"] == {g: {"condition": "service_healthy"} for g in GATEWAYS}
        for name in GATEWAYS:
            assert "depends_on" not in services[name]
