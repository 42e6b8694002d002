"""Helpers of the deployment tests: the repository root, the tools they run, unit files and stand-in commands."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def tool(name: str) -> str:
    """The path of a command the tests need: in the venv's bin directory (PyPI tools), else on PATH.

    A missing tool fails the test with what installs it, rather than skipping it.
    """
    beside_python = Path(sys.executable).with_name(name)
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: ./dev.sh test installs the test tools (pip install -e '.[test]', apt)")
    return found


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file: section name to its (key, value) pairs in order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"a setting outside any section: {line!r}"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    """Every value of ``key`` in ``section``, in order."""
    return [v for k, v in unit.get(section, []) if k == key]


STANDIN = """#!{python}
# Stand-in for {name}: records its arguments, answers what the test configured, fails on request.
import json, os, subprocess, sys
name = {name!r}
argv = sys.argv[1:]
record = {{"tool": name, "argv": argv, "cwd": os.getcwd()}}
if name == "kubectl" and argv[:2] == ["apply", "-k"]:
    directory = argv[2]
    with open(os.path.join(directory, "kustomization.yaml")) as f:
        record["kustomization"] = f.read()
    record["directory"] = os.path.abspath(directory)
    real = os.environ.get("STANDIN_REAL_KUBECTL")
    if real:
        rendered = subprocess.run([real, "kustomize", directory], capture_output=True, text=True)
        record["rendered"] = rendered.stdout
        record["render_error"] = rendered.stderr if rendered.returncode else ""
with open(os.environ["STANDIN_LOG"], "a") as f:
    f.write(json.dumps(record) + "\\n")
command = " ".join([name, *argv])
for rule in filter(None, os.environ.get("STANDIN_FAIL", "").split(";")):
    if command.startswith(rule):
        sys.stderr.write(f"stand-in {{name}}: failing on purpose\\n")
        sys.exit(7)
if name == "git":
    if os.environ.get("STANDIN_GIT_FAILS"):
        sys.stderr.write("fatal: not a git repository\\n")
        sys.exit(128)
    print("0123456789abcdef0123456789abcdef01234567" if argv[-1] == "HEAD" and "--short" not in argv else "abc1234")
if name == "kubectl" and "get" in argv and "secret" in argv:
    sys.exit(0 if os.environ.get("STANDIN_SECRET_EXISTS") else 1)
if name == "kubectl" and "get" in argv and "namespace" in argv:
    sys.exit(0 if os.environ.get("STANDIN_NAMESPACE_EXISTS") else 1)
"""


class StandIns:
    """A directory of stand-in commands on a PATH that holds nothing else but the basic tools a script needs."""

    BASIC = ("bash", "sh", "dirname", "tr", "od", "mktemp", "mkdir", "rm", "cat", "id", "sed", "env")

    def __init__(self, base: Path) -> None:
        self.bin = base / "bin"
        self.bin.mkdir(parents=True)
        self.log = base / "calls.jsonl"
        self.log.touch()
        for name in self.BASIC:
            real = shutil.which(name)
            assert real is not None, f"{name} is missing on this machine"
            (self.bin / name).symlink_to(real)

    def add(self, *names: str) -> None:
        """Put stand-ins for ``names`` (docker, podman, kubectl, git) on the PATH."""
        for name in names:
            path = self.bin / name
            path.write_text(STANDIN.format(python=sys.executable, name=name))
            path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

    def environ(self, **extra: str) -> dict[str, str]:
        """An environment whose PATH is only the stand-in directory."""
        env = {"PATH": str(self.bin), "STANDIN_LOG": str(self.log), "HOME": os.environ.get("HOME", "/tmp")}
        env.update(extra)
        return env

    def calls(self) -> list[dict[str, Any]]:
        """What the stand-ins were called with, in order."""
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]
