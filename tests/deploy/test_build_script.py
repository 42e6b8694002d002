"""build.sh, run against stand-in docker/podman/kubectl/git commands that record what they were asked to do."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import ROOT, StandIns, tool

BUILD = ROOT / "build.sh"


def run(standins: StandIns, **env: str) -> subprocess.CompletedProcess[str]:
    """Run build.sh with only the stand-ins (and basic tools) on PATH; the Compose secrets go to the
    stand-ins' directory unless SECRETS_DIR says otherwise (never into the repository)."""
    env.setdefault("SECRETS_DIR", str(standins.bin.parent / "secrets"))
    return subprocess.run(
        [str(BUILD)], cwd="/", env=standins.environ(**env), capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def standins(tmp_path: Path) -> StandIns:
    """docker, kubectl and git stand-ins."""
    s = StandIns(tmp_path)
    s.add("docker", "kubectl", "git")
    return s


def commands(standins: StandIns, tool_name: str) -> list[list[str]]:
    """The argument lists ``tool_name`` was called with."""
    return [c["argv"] for c in standins.calls() if c["tool"] == tool_name]


def tags(build_argv: list[str]) -> list[str]:
    """The --tag values of a build command."""
    return [build_argv[i + 1] for i, a in enumerate(build_argv) if a == "--tag"]


class ComposeSecretsTests:
    """The secrets docker-compose.yml reads: made once, random, private to their owner's directory."""

    def test_made_once(self, standins: StandIns, tmp_path: Path) -> None:
        """Two random 64-hex secrets in a 0700 directory (readable files, for the containers' user); never
        printed; a second run keeps them; the compose file names exactly these files."""
        secrets = tmp_path / "compose-secrets"
        result = run(standins, SECRETS_DIR=str(secrets))
        assert result.returncode == 0, result.stderr
        assert secrets.stat().st_mode & 0o777 == 0o700
        values = {}
        for name in ("raft-password", "token"):
            path = secrets / name
            assert path.stat().st_mode & 0o777 == 0o644
            values[name] = path.read_text().strip()
            assert re.fullmatch(r"[0-9a-f]{64}", values[name])
            assert values[name] not in result.stdout + result.stderr
        assert values["raft-password"] != values["token"]
        assert run(standins, SECRETS_DIR=str(secrets)).returncode == 0
        assert {name: (secrets / name).read_text().strip() for name in values} == values
        compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
        assert {k: v["file"] for k, v in compose["secrets"].items()} == {
            "raft-password": ".secrets/raft-password",
            "token": ".secrets/token",
        }
        assert "/.secrets/" in (ROOT / ".gitignore").read_text().splitlines()


class BuildTests:
    """Building and tagging."""

    def test_default_build(self, standins: StandIns) -> None:
        """./build.sh builds the root Dockerfile in the repository, tagged with the git short hash and latest."""
        result = run(standins)
        assert result.returncode == 0, result.stderr
        (build,) = commands(standins, "docker")
        assert build[0] == "build" and build[-1] == "."
        assert build[build.index("--file") + 1] == "Dockerfile"
        assert tags(build) == ["chashd:abc1234", "chashd:latest"]
        assert "org.opencontainers.image.revision=0123456789abcdef0123456789abcdef01234567" in build
        (call,) = [c for c in standins.calls() if c["tool"] == "docker"]
        assert Path(call["cwd"]) == ROOT
        assert commands(standins, "kubectl") == []
        assert "done: chashd:abc1234" in result.stderr

    def test_registry_and_tag(self, standins: StandIns) -> None:
        """REGISTRY prefixes the image name (a trailing slash is dropped) and TAG replaces the git hash."""
        result = run(standins, REGISTRY="registry.example.com/team/", TAG="v1.0.0")
        assert result.returncode == 0, result.stderr
        (build,) = commands(standins, "docker")
        assert tags(build) == ["registry.example.com/team/chashd:v1.0.0", "registry.example.com/team/chashd:latest"]

    def test_tag_without_git(self, tmp_path: Path) -> None:
        """With TAG set, git is not needed."""
        s = StandIns(tmp_path)
        s.add("docker")
        result = run(s, TAG="v2")
        assert result.returncode == 0, result.stderr
        assert tags(commands(s, "docker")[0])[0] == "chashd:v2"

    def test_no_git(self, tmp_path: Path) -> None:
        """Without TAG and without git, it stops before building and says to set TAG."""
        s = StandIns(tmp_path)
        s.add("docker")
        result = run(s)
        assert result.returncode != 0
        assert "TAG is not set and git is not installed" in result.stderr
        assert commands(s, "docker") == []

    def test_not_a_checkout(self, standins: StandIns) -> None:
        """When git cannot give a hash, it stops and says to set TAG."""
        result = run(standins, STANDIN_GIT_FAILS="1")
        assert result.returncode != 0
        assert "set TAG" in result.stderr
        assert commands(standins, "docker") == []

    def test_bad_tag(self, standins: StandIns) -> None:
        """A tag the engines would refuse is refused first."""
        result = run(standins, TAG="v1/../x")
        assert result.returncode != 0 and "not a valid image tag" in result.stderr
        assert commands(standins, "docker") == []

    def test_image_name(self, standins: StandIns) -> None:
        """IMAGE_NAME renames the image."""
        assert run(standins, IMAGE_NAME="kv", TAG="t").returncode == 0
        assert tags(commands(standins, "docker")[0]) == ["kv:t", "kv:latest"]


class EngineTests:
    """docker or podman, whichever is installed."""

    def test_podman_only(self, tmp_path: Path) -> None:
        """With only podman installed, podman builds."""
        s = StandIns(tmp_path)
        s.add("podman", "git")
        result = run(s)
        assert result.returncode == 0, result.stderr
        assert [c["tool"] for c in s.calls() if c["tool"] in ("docker", "podman")] == ["podman"]
        assert commands(s, "podman")[0][0] == "build"

    def test_docker_first(self, tmp_path: Path) -> None:
        """With both installed, docker builds."""
        s = StandIns(tmp_path)
        s.add("docker", "podman", "git")
        assert run(s).returncode == 0
        assert commands(s, "podman") == [] and len(commands(s, "docker")) == 1

    def test_engine_variable(self, tmp_path: Path) -> None:
        """ENGINE=podman picks podman even when docker is installed."""
        s = StandIns(tmp_path)
        s.add("docker", "podman", "git")
        assert run(s, ENGINE="podman").returncode == 0
        assert commands(s, "docker") == [] and len(commands(s, "podman")) == 1

    def test_no_engine(self, tmp_path: Path) -> None:
        """With neither installed, it says so."""
        s = StandIns(tmp_path)
        s.add("git")
        result = run(s)
        assert result.returncode != 0
        assert "neither docker nor podman is installed" in result.stderr


class PushTests:
    """PUSH=true."""

    def test_push(self, standins: StandIns) -> None:
        """After the build, both tags are pushed to the registry."""
        result = run(standins, REGISTRY="registry.example.com", PUSH="true", TAG="v1")
        assert result.returncode == 0, result.stderr
        assert [c[0] for c in commands(standins, "docker")] == ["build", "push", "push"]
        assert [c[1] for c in commands(standins, "docker")[1:]] == [
            "registry.example.com/chashd:v1",
            "registry.example.com/chashd:latest",
        ]

    def test_push_needs_registry(self, standins: StandIns) -> None:
        """PUSH=true without REGISTRY stops before building."""
        result = run(standins, PUSH="true")
        assert result.returncode != 0
        assert "PUSH=true needs REGISTRY" in result.stderr
        assert commands(standins, "docker") == []

    def test_bad_boolean(self, standins: StandIns) -> None:
        """PUSH must be a boolean."""
        result = run(standins, PUSH="sure")
        assert result.returncode != 0 and "PUSH must be true or false" in result.stderr

    def test_not_pushed_by_default(self, standins: StandIns) -> None:
        """PUSH=false (or unset) only builds."""
        assert run(standins, REGISTRY="r.example", PUSH="false").returncode == 0
        assert [c[0] for c in commands(standins, "docker")] == ["build"]


def _deployed_images(call: dict[str, Any]) -> set[str]:
    images: set[str] = set()
    for doc in yaml.safe_load_all(call["rendered"]):
        if doc and doc["kind"] in ("Deployment", "StatefulSet"):
            images.update(c["image"] for c in doc["spec"]["template"]["spec"]["containers"])
    return images


class DeployTests:
    """DEPLOY=true: kubectl apply -k k8s/ with the image just built."""

    def test_deploy(self, standins: StandIns) -> None:
        """It applies k8s/ through an overlay that sets the built image on every workload, then removes it."""
        result = run(
            standins,
            REGISTRY="registry.example.com",
            PUSH="true",
            DEPLOY="true",
            TAG="v1.0.0",
            STANDIN_REAL_KUBECTL=tool("kubectl"),
            STANDIN_NAMESPACE_EXISTS="1",
            STANDIN_SECRET_EXISTS="1",
        )
        assert result.returncode == 0, result.stderr
        order = [(c["tool"], c["argv"][0] if c["tool"] == "docker" else " ".join(c["argv"])) for c in standins.calls()]
        assert [t for t, _ in order if t == "docker"] == ["docker"] * 3
        # build and push come before anything is applied
        first_kubectl = next(i for i, (t, _) in enumerate(order) if t == "kubectl")
        assert all(t != "docker" for t, _ in order[first_kubectl:])
        (apply,) = [c for c in standins.calls() if c["tool"] == "kubectl" and c["argv"][:2] == ["apply", "-k"]]
        assert Path(apply["directory"]).parent == ROOT
        assert yaml.safe_load(apply["kustomization"])["resources"] == ["../k8s"]
        assert apply["render_error"] == ""
        assert _deployed_images(apply) == {"registry.example.com/chashd:v1.0.0"}
        assert not Path(apply["directory"]).exists(), "the temporary overlay was left behind"
        assert not [c for c in standins.calls() if "create" in c["argv"]], "an existing Secret was replaced"

    def test_deploy_local_image(self, standins: StandIns) -> None:
        """Without a registry the overlay names the local image, and the output says to load it into the cluster."""
        result = run(
            standins, DEPLOY="true", STANDIN_REAL_KUBECTL=tool("kubectl"), STANDIN_NAMESPACE_EXISTS="1",
            STANDIN_SECRET_EXISTS="1",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        (apply,) = [c for c in standins.calls() if c["tool"] == "kubectl" and c["argv"][:2] == ["apply", "-k"]]
        assert _deployed_images(apply) == {"chashd:abc1234"}
        assert "kind load docker-image chashd:abc1234" in result.stderr

    def test_deploy_creates_secret(self, standins: StandIns) -> None:
        """A missing namespace and Secret are created first; the secrets are random and never printed."""
        result = run(standins, DEPLOY="true", TAG="t")
        assert result.returncode == 0, result.stderr
        kubectl = commands(standins, "kubectl")
        assert kubectl[1] == ["apply", "-f", "k8s/namespace.yaml"]
        (create,) = [c for c in kubectl if "create" in c]
        assert create[:6] == ["--namespace", "consistent-hashing", "create", "secret", "generic", "chashd-secrets"]
        literals = dict(a.removeprefix("--from-literal=").split("=", 1) for a in create if a.startswith("--from"))
        assert set(literals) == {"raft-password", "token"}
        assert all(re.fullmatch(r"[0-9a-f]{64}", v) for v in literals.values())
        assert literals["raft-password"] != literals["token"]
        for secret in literals.values():
            assert secret not in result.stderr + result.stdout
        assert kubectl.index(create) < next(i for i, c in enumerate(kubectl) if c[:2] == ["apply", "-k"])

    def test_deploy_needs_kubectl(self, tmp_path: Path) -> None:
        """DEPLOY=true without kubectl stops before building."""
        s = StandIns(tmp_path)
        s.add("docker", "git")
        result = run(s, DEPLOY="true")
        assert result.returncode != 0 and "kubectl is not installed" in result.stderr
        assert commands(s, "docker") == []


class FailureTests:
    """The script stops at the first failure and says which step failed."""

    def test_build_fails(self, standins: StandIns) -> None:
        """A failed build stops everything after it."""
        result = run(standins, REGISTRY="r.example", PUSH="true", DEPLOY="true", STANDIN_FAIL="docker build")
        assert result.returncode != 0
        assert "build.sh: error: build failed (exit status 7)" in result.stderr
        assert [c[0] for c in commands(standins, "docker")] == ["build"]
        assert commands(standins, "kubectl") == []

    def test_push_fails(self, standins: StandIns) -> None:
        """A failed push stops before the second push and before the deploy."""
        result = run(standins, REGISTRY="r.example", PUSH="true", DEPLOY="true", STANDIN_FAIL="docker push")
        assert result.returncode != 0
        assert "push failed" in result.stderr
        assert [c[0] for c in commands(standins, "docker")] == ["build", "push"]
        assert commands(standins, "kubectl") == []

    def test_apply_fails(self, standins: StandIns) -> None:
        """A failed apply fails the script, and the temporary overlay is removed all the same."""
        result = run(
            standins, DEPLOY="true", STANDIN_FAIL="kubectl apply -k", STANDIN_NAMESPACE_EXISTS="1",
            STANDIN_SECRET_EXISTS="1",
        )  # fmt: skip
        assert result.returncode != 0
        assert "deploy failed" in result.stderr
        (apply,) = [c for c in standins.calls() if c["argv"][:2] == ["apply", "-k"]]
        assert not Path(apply["directory"]).exists()


class ShellCheckTests:
    """The shell scripts pass shellcheck."""

    @pytest.mark.parametrize("script", ["build.sh", "deploy/install.sh", "deploy/chash-kvstore-instance"])
    def test_shellcheck(self, script: str) -> None:
        """shellcheck finds nothing, at any severity."""
        result = subprocess.run(
            [tool("shellcheck"), "--severity=style", script], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr
