"""A plain, non-editable ``pip install .`` in a fresh virtual environment gives working twistd plugins."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, **kw)  # type: ignore[call-overload, no-any-return]


def _as_other_user(cmd: list[str]) -> list[str]:
    """Run as an unprivileged user when we are root, so that the install tree is really read-only."""
    if os.geteuid() == 0 and shutil.which("setpriv"):
        return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    return cmd


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    """A fresh venv where Twisted's plugin cache predates chashd, then chashd installed from a copy of the tree."""
    top = Path(tempfile.mkdtemp(prefix="chashd-install-", dir="/tmp"))
    try:
        top.chmod(0o755)
        source = top / "src"
        shutil.copytree(
            ROOT,
            source,
            ignore=shutil.ignore_patterns(
                ".venv", ".git", "__pycache__", "*.egg-info", "build", "dropin.cache", ".*_cache"
            ),
        )
        venv = top / "venv"
        base_python = getattr(sys, "_base_executable", sys.executable)
        result = _run([base_python, "-m", "venv", str(venv)])
        assert result.returncode == 0, result.stderr
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        result = _run([*pip, "twisted"])
        assert result.returncode == 0, result.stderr
        # The plugin cache as Twisted alone leaves it: stale once chashd's plugins arrive.
        cache = _run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))",
            ]
        )
        assert cache.returncode == 0, cache.stderr
        result = _run([*pip, str(source)])
        assert result.returncode == 0, result.stderr
        plugins = next(venv.glob("lib/python*/site-packages/twisted/plugins"))
        assert (plugins / "dropin.cache").exists()
        assert not (plugins / "__init__.py").exists() or (plugins / "chash_gateway.py").exists()
        if os.geteuid() != 0:
            plugins.chmod(0o555)
        yield venv
    finally:
        for path in top.rglob("plugins"):
            path.chmod(0o755)
        shutil.rmtree(top, ignore_errors=True)


class InstalledTests:
    """The installed tree, not the source tree, provides both plugins."""

    def test_twistd_lists_plugins(self, installed: Path) -> None:
        """twistd --help lists chash-gateway and chash-kvstore despite a stale, unwritable plugin cache."""
        result = _run(_as_other_user([str(installed / "bin" / "twistd"), "--help"]), cwd="/")
        assert result.returncode == 0, result.stderr
        assert "chash-gateway" in result.stdout and "chash-kvstore" in result.stdout

    @pytest.mark.parametrize(("role", "option"), [("chash-gateway", "--raft-port"), ("chash-kvstore", "--node-id")])
    def test_role_help(self, installed: Path, role: str, option: str) -> None:
        """Each role prints its options."""
        result = _run(_as_other_user([str(installed / "bin" / "twistd"), role, "--help"]), cwd="/")
        assert result.returncode == 0, result.stderr
        assert option in result.stdout and "--line-port" in result.stdout

    def test_every_package_is_installed(self, installed: Path) -> None:
        """Every package of the source tree (setup.cfg lists them one by one) is in site-packages."""
        site = next(installed.glob("lib/python*/site-packages"))
        packages = sorted(p.parent.relative_to(ROOT) for p in (ROOT / "chashd").rglob("__init__.py"))
        assert packages and [p for p in packages if not (site / p / "__init__.py").exists()] == []

    def test_imports_from_site_packages(self, installed: Path) -> None:
        """chashd comes from the venv's site-packages, and the chash script runs."""
        result = _run([str(installed / "bin" / "python"), "-c", "import chashd; print(chashd.__file__)"], cwd="/")
        assert "site-packages" in result.stdout and str(ROOT) not in result.stdout
        result = _run([str(installed / "bin" / "chash"), "--version"], cwd="/")
        assert result.returncode == 0 and "chash" in result.stdout
