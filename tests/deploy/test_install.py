"""deploy/install.sh into a staging directory (DESTDIR): the venv works, units and config land where the units
expect them, an existing configuration is kept, and systemd-analyze verify passes against the installed tree."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.conftest import ROOT, tool
from tests.deploy.test_systemd import SYSTEM_UNITS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed() -> Iterator[tuple[Path, subprocess.CompletedProcess[str]]]:
    """One run of install.sh with DESTDIR, over a pre-existing /etc/chashd/gateway.yaml."""
    top = Path(tempfile.mkdtemp(prefix="chashd-destdir-", dir="/tmp"))
    try:
        destdir = top / "root"
        (destdir / "etc" / "chashd").mkdir(parents=True)
        (destdir / "etc" / "chashd" / "gateway.yaml").write_text("gateway-id: mine\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CHASHD_", "PIP_", "VIRTUAL_ENV"))}
        env.update(DESTDIR=str(destdir), PYTHON=getattr(sys, "_base_executable", sys.executable))
        result = subprocess.run(
            [str(ROOT / "deploy" / "install.sh")], env=env, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, result.stderr[-3000:]
        yield destdir, result
    finally:
        shutil.rmtree(top, ignore_errors=True)


class InstallTests:
    """What install.sh leaves behind."""

    def test_venv(self, installed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
        """/opt/chashd holds chashd (not editable), the plugin cache, and twistd knows both roles."""
        destdir, _ = installed
        venv = destdir / "opt" / "chashd"
        caches = list(venv.glob("lib/python3*/site-packages/twisted/plugins/dropin.cache"))
        assert len(caches) == 1
        assert list(venv.glob("lib/python3*/site-packages/chashd/ring.py")), "chashd is not installed in the venv"
        for role in ("chash-gateway", "chash-kvstore"):
            result = subprocess.run(
                [str(venv / "bin" / "twistd"), role, "--help"], capture_output=True, text=True, timeout=120
            )
            assert result.returncode == 0 and "--port" in result.stdout, result.stderr
        assert os.access(venv / "bin" / "chash-kvstore-instance", os.X_OK)
        assert (venv / "share" / "doc" / "chashd" / "README.md").exists()

    def test_units(self, installed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
        """The units and the sysusers file are installed unchanged."""
        destdir, _ = installed
        for name in ("chash-gateway.service", "chash-kvstore.service", "chash-kvstore@.service", "chash.target"):
            installed_unit = destdir / "etc" / "systemd" / "system" / name
            assert installed_unit.read_text() == (ROOT / "systemd" / name).read_text()
            assert installed_unit.stat().st_mode & 0o777 == 0o644
        sysusers = (destdir / "etc" / "sysusers.d" / "chashd.conf").read_text()
        assert re.search(r"^u chashd ", sysusers, re.M)

    def test_config(self, installed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
        """An existing file is kept, missing ones are installed, chashd.env gets random secrets and mode 0600."""
        destdir, result = installed
        conf = destdir / "etc" / "chashd"
        assert (conf / "gateway.yaml").read_text() == "gateway-id: mine\n"
        assert "keeping the existing" in result.stderr
        assert (conf / "kvstore.yaml").read_text() == (ROOT / "deploy" / "etc" / "kvstore.yaml").read_text()
        env = (conf / "chashd.env").read_text()
        secrets = dict(re.findall(r"^(CHASHD_RAFT_PASSWORD|CHASHD_TOKEN)=(\S*)$", env, re.M))
        assert set(secrets) == {"CHASHD_RAFT_PASSWORD", "CHASHD_TOKEN"}
        assert all(re.fullmatch(r"[0-9a-f]{64}", v) for v in secrets.values())
        assert secrets["CHASHD_RAFT_PASSWORD"] != secrets["CHASHD_TOKEN"]
        assert (conf / "chashd.env").stat().st_mode & 0o777 == 0o600
        assert conf.stat().st_mode & 0o777 == 0o750
        for value in secrets.values():
            assert value not in result.stderr + result.stdout

    def test_verify_installed_tree(self, installed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
        """systemd-analyze verify accepts the installed units with the real ExecStart binaries of the install."""
        destdir, _ = installed
        system = destdir / "usr" / "lib" / "systemd" / "system"
        system.mkdir(parents=True, exist_ok=True)
        for name in SYSTEM_UNITS:
            (system / name).write_text(f"[Unit]\nDescription=stand-in {name}\n")
        (destdir / "tmp").mkdir(exist_ok=True)
        for unit in ("chash-gateway.service", "chash-kvstore.service", "chash-kvstore@kv2.service", "chash.target"):
            result = subprocess.run(
                [tool("systemd-analyze"), "verify", f"--root={destdir}", unit],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode == 0 and result.stderr == "", f"{unit}: {result.stderr}"
