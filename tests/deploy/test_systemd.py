"""systemd/ units: ``systemd-analyze verify`` (in a temporary root, never the machine's systemd) and
``systemd-analyze security --offline=true``, the units' settings, the instance helper and the example configs.

Nothing here boots systemd, talks to a running manager or touches cgroups: verify --root and security --offline
only read unit files.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from chashd.config import GatewayConfig, KVStoreConfig, load_config, option_specs
from tests.deploy.conftest import ROOT, parse_unit, tool, values

SYSTEMD = ROOT / "systemd"
SERVICES = ("chash-gateway.service", "chash-kvstore.service", "chash-kvstore@.service")
UNITS = (*SERVICES, "chash.target")
#: Each unit as verify and security see it: a template through one of its instances.
AS_LOADED = {
    "chash-gateway.service": "chash-gateway.service",
    "chash-kvstore.service": "chash-kvstore.service",
    "chash-kvstore@.service": "chash-kvstore@kv1.service",
    "chash.target": "chash.target",
}
#: Units outside this project that ours (or their default dependencies) name.
SYSTEM_UNITS = ("sysinit.target", "basic.target", "shutdown.target", "network-online.target", "multi-user.target")


def exec_paths(unit_text: str) -> list[str]:
    """The executables of the unit's Exec*= lines (prefixes such as '-' or '@' dropped)."""
    paths = []
    for section in parse_unit(unit_text).values():
        for key, value in section:
            if key.startswith("Exec"):
                paths.append(shlex.split(value)[0].lstrip("-@:+!"))
    return paths


def make_root(base: Path, unit_files: dict[str, str]) -> Path:
    """A file system root holding the units, stand-in executables at their Exec paths, and stand-in system targets."""
    root = base / "root"
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    system = root / "usr" / "lib" / "systemd" / "system"
    system.mkdir(parents=True)
    (root / "tmp").mkdir()
    for name, text in unit_files.items():
        (units / name).write_text(text)
        for path in exec_paths(text):
            binary = root / path.lstrip("/")
            binary.parent.mkdir(parents=True, exist_ok=True)
            binary.write_text("#!/bin/sh\nexit 0\n")
            binary.chmod(0o755)
    for name in SYSTEM_UNITS:
        (system / name).write_text(f"[Unit]\nDescription=stand-in {name}\n")
    return root


def verify(root: Path, unit: str) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify of ``unit`` inside ``root``."""
    return subprocess.run(
        [tool("systemd-analyze"), "verify", f"--root={root}", unit], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def unit_texts() -> dict[str, str]:
    """The unit files."""
    return {name: (SYSTEMD / name).read_text() for name in UNITS}


class VerifyTests:
    """systemd-analyze verify accepts every unit without a word on stderr."""

    @pytest.mark.parametrize("name", UNITS)
    def test_verify(self, unit_texts: dict[str, str], tmp_path: Path, name: str) -> None:
        """Exit status 0 and nothing on stderr (verify only warns, exit 0, on unknown keys and bad values)."""
        result = verify(make_root(tmp_path, unit_texts), AS_LOADED[name])
        assert result.stderr == "", result.stderr
        assert result.returncode == 0

    def test_verify_catches_unknown_key(self, unit_texts: dict[str, str], tmp_path: Path) -> None:
        """A misspelled key shows on stderr in the same setup (so the test above can fail)."""
        broken = dict(unit_texts)
        broken["chash-gateway.service"] = unit_texts["chash-gateway.service"].replace("PrivateTmp=", "PrivatTmp=")
        result = verify(make_root(tmp_path, broken), "chash-gateway.service")
        assert "Unknown key" in result.stderr and "PrivatTmp" in result.stderr

    def test_verify_catches_missing_binary(self, unit_texts: dict[str, str], tmp_path: Path) -> None:
        """A missing ExecStart binary fails verify (the stand-ins are what make the test above pass)."""
        root = make_root(tmp_path, unit_texts)
        (root / "opt" / "chashd" / "bin" / "twistd").unlink()
        result = verify(root, "chash-gateway.service")
        assert result.returncode != 0 and "/opt/chashd/bin/twistd" in result.stderr


def exposure(root: Path, unit: str) -> float:
    """The overall exposure level systemd-analyze security --offline=true gives ``unit`` (0 safe .. 10 unsafe)."""
    result = subprocess.run(
        [tool("systemd-analyze"), "security", "--offline=true", f"--root={root}", "--no-pager", unit],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # The last line: "→ Overall exposure level for chash-gateway.service: 1.1 OK 🙂"
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+) ", result.stdout)
    assert match, result.stdout[-500:]
    return float(match.group(1))


class SecurityTests:
    """systemd-analyze security rates each service 2.0 or better."""

    @pytest.mark.parametrize("name", SERVICES)
    def test_exposure(self, unit_texts: dict[str, str], tmp_path: Path, name: str) -> None:
        """Exposure level at most 2.0 ("OK")."""
        assert exposure(make_root(tmp_path, unit_texts), AS_LOADED[name]) <= 2.0

    def test_unhardened_rates_high(self, tmp_path: Path) -> None:
        """The same measure rates a service without hardening far above 2.0 (so the test above can fail)."""
        plain = "[Service]\nType=notify\nExecStart=/opt/chashd/bin/twistd --nodaemon chash-gateway\n"
        assert exposure(make_root(tmp_path, {"plain.service": plain}), "plain.service") > 5.0


class UnitSettingsTests:
    """What the issue asks of the services."""

    @pytest.mark.parametrize("name", SERVICES)
    def test_service(self, unit_texts: dict[str, str], name: str) -> None:
        """notify, restart on failure, a state directory, the dedicated user, the config and optional env files."""
        unit = parse_unit(unit_texts[name])
        one = {key: values(unit, "Service", key) for key in ("Type", "Restart", "User", "StateDirectory")}
        assert one["Type"] == ["notify"] and one["Restart"] == ["on-failure"]
        assert one["User"] == ["chashd"]
        assert len(one["StateDirectory"]) == 1 and one["StateDirectory"][0].startswith("chashd/")
        environment = " ".join(values(unit, "Service", "Environment"))
        assert re.search(r"CHASHD_CONFIG=/etc/chashd/\w+\.yaml", environment)
        assert f"CHASHD_DATA_DIR=%S/{one['StateDirectory'][0]}" in environment
        files = values(unit, "Service", "EnvironmentFile")
        assert files and all(f.startswith("-/etc/chashd/") for f in files)
        assert values(unit, "Install", "WantedBy") == ["chash.target"]
        assert values(unit, "Unit", "PartOf") == ["chash.target"]

    @pytest.mark.parametrize("name", SERVICES)
    def test_hardening(self, unit_texts: dict[str, str], name: str) -> None:
        """The hardening settings the issue lists."""
        unit = parse_unit(unit_texts[name])
        expected = {
            "NoNewPrivileges": "yes",
            "ProtectSystem": "strict",
            "ProtectHome": "yes",
            "PrivateTmp": "yes",
            "PrivateDevices": "yes",
            "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
            "CapabilityBoundingSet": "",
        }
        for key, value in expected.items():
            assert values(unit, "Service", key) == [value], key
        assert values(unit, "Service", "SystemCallFilter")[0] == "@system-service"

    def test_foreground_twistd(self, unit_texts: dict[str, str]) -> None:
        """The plain units run twistd in the foreground from /opt/chashd, with no pid file."""
        for name, role in (("chash-gateway.service", "chash-gateway"), ("chash-kvstore.service", "chash-kvstore")):
            (start,) = values(parse_unit(unit_texts[name]), "Service", "ExecStart")
            assert shlex.split(start) == ["/opt/chashd/bin/twistd", "--nodaemon", "--pidfile=", role]

    def test_gateway_stops_its_own_workers(self, unit_texts: dict[str, str]) -> None:
        """SIGTERM goes to the gateway's main process only, which stops its workers (--workers) itself."""
        assert values(parse_unit(unit_texts["chash-gateway.service"]), "Service", "KillMode") == ["mixed"]

    @pytest.mark.parametrize("name", ["chash-kvstore.service", "chash-kvstore@.service"])
    def test_stop_timeout_covers_drain(self, unit_texts: dict[str, str], name: str) -> None:
        """TimeoutStopSec is longer than the drain timeout the example configuration gives the daemon."""
        example = load_config(KVStoreConfig, environ={"CHASHD_CONFIG": str(ROOT / "deploy" / "etc" / "kvstore.yaml")})
        (stop,) = values(parse_unit(unit_texts[name]), "Service", "TimeoutStopSec")
        assert int(stop) > example.drain_timeout

    def test_target(self, unit_texts: dict[str, str]) -> None:
        """chash.target starts with the machine."""
        assert values(parse_unit(unit_texts["chash.target"]), "Install", "WantedBy") == ["multi-user.target"]


def run_instance(tmp_path: Path, name: str, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run deploy/chash-kvstore-instance from a directory holding a stand-in twistd; what twistd got."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shutil.copy(ROOT / "deploy" / "chash-kvstore-instance", bin_dir)
    record = tmp_path / "argv"
    (bin_dir / "twistd").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    (bin_dir / "twistd").chmod(0o755)
    result = subprocess.run(
        [str(bin_dir / "chash-kvstore-instance"), name],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    argv = record.read_text().splitlines() if record.exists() else []
    return result, argv


def as_cli(argv: list[str]) -> dict[str, str]:
    """``--flag value`` pairs after the role name, as the loader's cli mapping."""
    rest = argv[argv.index("chash-kvstore") + 1 :]
    return {rest[i][2:].replace("-", "_"): rest[i + 1] for i in range(0, len(rest), 2)}


class InstanceHelperTests:
    """deploy/chash-kvstore-instance: the instance name is the node id and its number the port offset."""

    @pytest.mark.parametrize(
        ("name", "port", "line_port"),
        [("kv3", 8083, 11215), ("db1-kv007", 8087, 11219), ("0", 8080, 11212), ("12", 8092, 11224)],
    )
    def test_derived(self, tmp_path: Path, name: str, port: int, line_port: int) -> None:
        """Node id and ports come from the name (leading zeros are not octal), and the loader accepts them."""
        result, argv = run_instance(tmp_path, name)
        assert result.returncode == 0, result.stderr
        assert argv[:3] == ["--nodaemon", "--pidfile=", "chash-kvstore"]
        config = load_config(KVStoreConfig, cli=as_cli(argv), environ={})
        assert (config.node_id, config.port, config.line_port) == (name, f"tcp:{port}", f"tcp:{line_port}")

    def test_overrides(self, tmp_path: Path) -> None:
        """CHASHD_NODE_ID, CHASHD_PORT and CHASHD_LINE_PORT from the instance's env file replace derived values."""
        result, argv = run_instance(
            tmp_path, "kv1", CHASHD_NODE_ID="db1-kv1", CHASHD_PORT="tcp:9001", CHASHD_LINE_PORT="12001"
        )
        assert result.returncode == 0, result.stderr
        assert as_cli(argv) == {"node_id": "db1-kv1", "port": "tcp:9001", "line_port": "12001"}

    @pytest.mark.parametrize("name", ["kv", "kv1000", ""])
    def test_refused(self, tmp_path: Path, name: str) -> None:
        """A name without a number, or with an offset above 999, is refused with a message; twistd never runs."""
        result, argv = run_instance(tmp_path, name)
        assert result.returncode == 2
        assert result.stderr.startswith("chash-kvstore-instance: ")
        assert argv == []


class ExampleConfigTests:
    """The files deploy/install.sh puts in /etc/chashd."""

    def test_yaml_files_load(self) -> None:
        """gateway.yaml and kvstore.yaml load with the daemons' own loader."""
        gateway = load_config(GatewayConfig, environ={"CHASHD_CONFIG": str(ROOT / "deploy" / "etc" / "gateway.yaml")})
        kvstore = load_config(KVStoreConfig, environ={"CHASHD_CONFIG": str(ROOT / "deploy" / "etc" / "kvstore.yaml")})
        assert gateway.port == "tcp:8000" and gateway.raft_port == 8001
        assert kvstore.gateway == ("http://127.0.0.1:8000",) and kvstore.engine == "sqlite"

    def test_env_file(self) -> None:
        """chashd.env sets only known secret options, empty until install.sh fills them in."""
        known = {v for c in (GatewayConfig, KVStoreConfig) for spec in option_specs(c) if spec.secret for v in spec.env}
        lines = [
            line
            for line in (ROOT / "deploy" / "etc" / "chashd.env").read_text().splitlines()
            if line and not line.startswith("#")
        ]
        assert {line.split("=")[0] for line in lines} <= known
        assert all(line.endswith("=") for line in lines)
