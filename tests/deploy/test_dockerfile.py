"""The Dockerfile (linted by hadolint), its .dockerignore, and the image's health check script."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from chashd.launcher import SEED_VARIABLES
from tests.deploy.conftest import ROOT, tool


def instructions(text: str) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def stages(text: str) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (an ARG before the first FROM belongs to none)."""
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, rest))
    return result


@pytest.fixture(scope="module")
def dockerfile() -> str:
    """The root Dockerfile."""
    return (ROOT / "Dockerfile").read_text()


class HadolintTests:
    """hadolint has nothing to say."""

    def test_no_finding(self, tmp_path: Path) -> None:
        """Not one finding, at any level (error, warning, info, style), with no project config ignoring rules."""
        config = tmp_path / "hadolint.yaml"
        config.write_text("failure-threshold: style\n")
        result = subprocess.run(
            [tool("hadolint"), "--config", str(config), "--format", "json", str(ROOT / "Dockerfile")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert json.loads(result.stdout or "[]") == [], result.stdout
        assert result.returncode == 0, result.stderr

    def test_hadolint_catches(self, tmp_path: Path) -> None:
        """The same command does report an unpinned apt-get install (the check above can fail)."""
        bad = tmp_path / "Dockerfile"
        bad.write_text("FROM python:3.11-slim\nRUN apt-get update && apt-get install -y curl\n")
        result = subprocess.run(
            [tool("hadolint"), "--format", "json", str(bad)], capture_output=True, text=True, timeout=120
        )
        assert "DL3008" in {finding["code"] for finding in json.loads(result.stdout)}


class ImageTests:
    """What the image is made of."""

    def test_base_and_stages(self, dockerfile: str) -> None:
        """Both stages start from python:3.11-slim; the final one copies the venv and installs nothing itself."""
        (default,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, re.M)
        assert default == "python:3.11-slim"
        build, final = stages(dockerfile)
        assert build[0] == ("FROM", "${PYTHON_IMAGE} AS build")
        assert final[0] == ("FROM", "${PYTHON_IMAGE}")
        assert ("COPY", "--from=build /opt/chashd /opt/chashd") in final
        for keyword, rest in final:
            if keyword == "RUN":
                assert not re.search(r"\b(pip|apt-get|apt|gcc|make)\b\s", rest), rest

    def test_non_root(self, dockerfile: str) -> None:
        """The final stage runs as a fixed, numeric, non-root uid, which owns only its data directory."""
        final = stages(dockerfile)[-1]
        users = [rest for keyword, rest in final if keyword == "USER"]
        assert users == ["${CHASHD_UID}:${CHASHD_UID}"]
        (uid,) = re.findall(r"^ARG CHASHD_UID=(\d+)$", dockerfile, re.M)
        assert int(uid) >= 1000
        run = " ".join(rest for keyword, rest in final if keyword == "RUN")
        assert '--uid "${CHASHD_UID}"' in run
        assert "install -d -o chashd -g chashd -m 0700 /var/lib/chashd" in run
        assert ("WORKDIR", "/var/lib/chashd") in final

    def test_plugin_cache_built(self, dockerfile: str) -> None:
        """The twistd plugin cache is written while building the final stage, before USER drops root."""
        final = stages(dockerfile)[-1]
        keywords = [k for k, _ in final]
        cache = next(
            i for i, (k, rest) in enumerate(final) if k == "RUN" and "getPlugins(IPlugin)" in rest
        )  # fmt: skip
        assert cache > keywords.index("COPY") and cache < keywords.index("USER")
        assert "twistd chash-gateway --help" in final[cache][1] and "twistd chash-kvstore --help" in final[cache][1]

    def test_healthcheck_and_command(self, dockerfile: str) -> None:
        """The image has a HEALTHCHECK running the copied health check script, and a role as its command."""
        final = stages(dockerfile)[-1]
        (health,) = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
        assert health.endswith('CMD ["chashd-healthcheck"]')
        assert ("COPY", "deploy/healthcheck.py /usr/local/bin/chashd-healthcheck") in final
        (cmd,) = [rest for keyword, rest in final if keyword == "CMD"]
        assert json.loads(cmd)[:4] == ["twistd", "--nodaemon", "--pidfile=", "chash-gateway"]

    def test_seed_variables_left_to_the_roles(self, dockerfile: str) -> None:
        """No ENV sets a short-named variable: LISTEN_PORT in the image would move one role off its default port."""
        env = " ".join(rest for keyword, rest in instructions(dockerfile) if keyword == "ENV")
        for name in SEED_VARIABLES:
            assert name not in env

    def test_ports(self, dockerfile: str) -> None:
        """Both roles' default ports are exposed."""
        (expose,) = [rest for keyword, rest in instructions(dockerfile) if keyword == "EXPOSE"]
        assert set(expose.split()) == {"8000", "8001", "11211", "8080", "11212"}


class DockerignoreTests:
    """The build context is exactly what the Dockerfile copies."""

    def test_allowlist_matches_copies(self, dockerfile: str) -> None:
        """.dockerignore excludes everything, then allows back exactly the paths the COPY lines name."""
        lines = [
            line.strip()
            for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        assert lines[0] == "*"
        allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
        copied = set()
        for keyword, rest in instructions(dockerfile):
            if keyword == "COPY" and not rest.startswith("--from"):
                copied.update(shlex.split(rest)[:-1])
        assert allowed == copied
        for path in copied:
            assert (ROOT / path).exists(), path
        for kept_out in ("**/__pycache__", "**/dropin.cache"):
            assert kept_out in lines


class HealthcheckScriptTests:
    """deploy/healthcheck.py picks the port the daemon listens on."""

    @pytest.fixture
    def module(self) -> object:
        """The script, imported as a module."""
        import importlib.util

        spec = importlib.util.spec_from_file_location("chashd_healthcheck", ROOT / "deploy" / "healthcheck.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    @pytest.mark.parametrize(
        ("environ", "ports"),
        [
            ({}, (8000, 8080)),
            ({"LISTEN_PORT": "8081"}, (8081,)),
            ({"CHASHD_PORT": "tcp:9000:interface=0.0.0.0"}, (9000,)),
            ({"CHASHD_PORT": "tcp:interface=::1:port=9001"}, (9001,)),
            ({"LISTEN_PORT": "8082", "CHASHD_HEALTH_PORT": "7000"}, (7000,)),
            ({"LISTEN_PORT": "unix:/run/x.sock"}, (8000, 8080)),
        ],
    )
    def test_ports(self, module: object, environ: dict[str, str], ports: tuple[int, ...]) -> None:
        """The port comes from CHASHD_HEALTH_PORT, LISTEN_PORT or CHASHD_PORT, else both roles' defaults."""
        assert module.ports_to_probe(environ) == ports  # type: ignore[attr-defined]
