"""Every chash subcommand as a real process against a real cluster (1 gateway, 3 kvstores), including the
failure paths: no gateway reachable, unknown keys and nodes, bad arguments."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chashd.client import KVStoreClient
from chashd.launcher import LocalCluster, clean_environ, free_ports

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One gateway (N=3, W=2, R=2) and three kvstores."""
    with LocalCluster(tmp_path_factory.mktemp("cli"), gateways=1, kvstores=3, env=clean_environ()) as running:
        yield running


def chash(
    *argv: str, gateway: str | None = None, stdin: bytes = b"", timeout: float = 60, token: str | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run ``chash`` with ``CHASH_GATEWAY`` set to ``gateway`` (and ``CHASH_TOKEN`` to ``token``)."""
    env = clean_environ()
    env.pop("CHASH_TOKEN", None)
    if gateway is not None:
        env["CHASH_GATEWAY"] = gateway
    if token is not None:
        env["CHASH_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "chashd.cli", *argv], input=stdin, capture_output=True, env=env, timeout=timeout
    )


def one_line(result: subprocess.CompletedProcess[bytes]) -> str:
    """stderr, which must be exactly one line without a traceback."""
    text = result.stderr.decode()
    assert len(text.strip().splitlines()) == 1, text
    assert "Traceback" not in text
    return text.strip()


def dead_url() -> str:
    return f"http://127.0.0.1:{free_ports(1)[0]}"


class KeyCommandTests:
    """put, get, delete."""

    def test_put_get_bytes(self, cluster: LocalCluster) -> None:
        """A value from stdin comes back byte for byte on stdout, with nothing on stderr."""
        gw = cluster.gateway_urls[0]
        value = bytes(range(256)) * 3
        assert chash("put", "cli:bin", "-", gateway=gw, stdin=value).returncode == 0
        got = chash("get", "cli:bin", gateway=gw)
        assert (got.returncode, got.stdout, got.stderr) == (0, value, b"")

    def test_ttl_flags_json(self, cluster: LocalCluster) -> None:
        """--ttl and --flags are stored; get --json shows them, the version and the value (base64 if binary)."""
        gw = cluster.gateway_urls[0]
        assert chash("put", "cli:meta", "héllo", "--ttl", "600", "--flags", "9", gateway=gw).returncode == 0
        shown = json.loads(chash("get", "cli:meta", "--json", gateway=gw).stdout)
        assert shown["value"] == "héllo" and shown["encoding"] == "utf-8" and shown["flags"] == 9
        assert time.time() < shown["expires_at"] < time.time() + 700 and shown["cas"] > 0
        chash("put", "cli:binjson", "-", gateway=gw, stdin=b"\xff\x00")
        shown = json.loads(chash("get", "cli:binjson", "--json", gateway=gw).stdout)
        assert (shown["value"], shown["encoding"]) == ("/wA=", "base64")

    def test_unknown_key(self, cluster: LocalCluster) -> None:
        """get and delete of a key without a value exit 1 with one line on stderr and nothing on stdout."""
        gw = cluster.gateway_urls[0]
        for command in ("get", "delete"):
            result = chash(command, "cli:never-set", gateway=gw)
            assert result.returncode == 1 and result.stdout == b""
            assert one_line(result) == "chash: no value for key 'cli:never-set'"

    def test_delete(self, cluster: LocalCluster) -> None:
        """delete exits 0 when it removed a value; the key then reads as not found."""
        gw = cluster.gateway_urls[0]
        chash("put", "cli:del", "x", gateway=gw)
        assert chash("delete", "cli:del", gateway=gw).returncode == 0
        assert chash("get", "cli:del", gateway=gw).returncode == 1

    def test_refused_value(self, cluster: LocalCluster) -> None:
        """A value over the server's limit is its 413, shown as one line, exit 2."""
        result = chash("put", "cli:big", "-", gateway=cluster.gateway_urls[0], stdin=b"x" * (1024 * 1024 + 1))
        assert result.returncode == 2
        assert "over the limit" in one_line(result)


class ClusterCommandTests:
    """lookup, ring, status, nodes."""

    def test_lookup(self, cluster: LocalCluster) -> None:
        """lookup prints the preference list, primary first, the same as --json and the local ring."""
        gw = cluster.gateway_urls[0]
        as_json = json.loads(chash("lookup", "user:7", "--json", gateway=gw).stdout)
        expected = list(KVStoreClient(gw).hash_ring().preference_list("user:7", 3))
        assert [n["id"] for n in as_json["nodes"]] == expected
        text = chash("lookup", "user:7", gateway=gw).stdout.decode()
        rows = [line.split() for line in text.splitlines()[2:]]
        assert [row[1] for row in rows] == expected
        assert rows[0][-1] == "primary"

    def test_ring(self, cluster: LocalCluster) -> None:
        """ring shows each node with state, weight, share (summing to 100%) and keys; --json the same numbers."""
        gw = cluster.gateway_urls[0]
        KVStoreClient(gw).put("cli:ring", b"x")
        as_json = json.loads(chash("ring", "--json", gateway=gw).stdout)
        nodes = {n["id"]: n for n in as_json["nodes"]}
        assert set(nodes) == {k.name for k in cluster.kvstores}
        assert abs(sum(n["share"] for n in nodes.values()) - 1) < 1e-9
        assert {n["state"] for n in nodes.values()} == {"up"} and {n["weight"] for n in nodes.values()} == {100}
        lines = chash("ring", gateway=gw).stdout.decode().splitlines()
        assert lines[1].split()[:5] == ["NODE", "STATE", "WEIGHT", "SHARE", "KEYS"]
        shares = [float(line.split()[3].rstrip("%")) for line in lines[2:]]
        assert len(shares) == 3 and abs(sum(shares) - 100) < 0.2

    def test_ring_svg(self, cluster: LocalCluster, tmp_path: Path) -> None:
        """ring --svg FILE writes the gateway's status-page picture of the ring (the table still printed);
        --svg - writes it to stdout; a file that cannot be written is one line and exit 2."""
        import urllib.request
        import xml.etree.ElementTree as ET

        gw = cluster.gateway_urls[0]
        target = tmp_path / "ring.svg"
        result = chash("ring", "--svg", str(target), gateway=gw)
        assert result.returncode == 0 and b"NODE" in result.stdout
        root = ET.fromstring(target.read_text())
        arcs = {p.get("data-node") for p in root.iter("{http://www.w3.org/2000/svg}path") if p.get("data-node")}
        assert arcs == {k.name for k in cluster.kvstores}
        with urllib.request.urlopen(gw + "/status/ring.svg", timeout=10) as response:
            assert response.read().decode() == target.read_text()
        to_stdout = chash("ring", "--svg", "-", gateway=gw)
        assert to_stdout.stdout.decode() == target.read_text()
        failed = chash("ring", "--svg", str(tmp_path / "missing" / "ring.svg"), gateway=gw)
        assert failed.returncode == 2 and "--svg: cannot write" in one_line(failed)

    def test_status(self, cluster: LocalCluster) -> None:
        """status names the gateway, the leader, the epoch and rebalancing; --json is the gateway's JSON."""
        gw = cluster.gateway_urls[0]
        as_json = json.loads(chash("status", "--json", gateway=gw).stdout)
        assert as_json["leader"] == "gateway-1" and "rebalancing" in as_json
        text = chash("status", gateway=gw).stdout.decode()
        assert text.startswith(f"answered by gateway-1; leader gateway-1; epoch {as_json['epoch']}; N=3 W=2 R=2")
        assert "rebalancing:" in text and "kvstore-A" in text

    def test_nodes(self, cluster: LocalCluster) -> None:
        """nodes lists the map; --json too."""
        gw = cluster.gateway_urls[0]
        listed = json.loads(chash("nodes", "--json", gateway=gw).stdout)
        assert {n["id"] for n in listed} == {k.name for k in cluster.kvstores}
        assert "kvstore-B" in chash("nodes", gateway=gw).stdout.decode()

    def test_unknown_node(self, cluster: LocalCluster) -> None:
        """drain and remove of an unknown node exit 1 with the gateway's words."""
        for action in ("drain", "remove"):
            result = chash("nodes", action, "nobody", gateway=cluster.gateway_urls[0], token=cluster.token)
            assert result.returncode == 1
            assert one_line(result) == "chash: no node 'nobody' in the ring"

    def test_admin_needs_the_token(self, cluster: LocalCluster) -> None:
        """The cluster has a token of its own: drain without it (or with another) is refused, exit 3."""
        for token in (None, "not-the-token"):
            result = chash("nodes", "drain", "kvstore-A", gateway=cluster.gateway_urls[0], token=token)
            assert result.returncode == 3 and "token" in one_line(result).lower()
        listed = json.loads(chash("nodes", "--json", gateway=cluster.gateway_urls[0]).stdout)
        assert {n["id"]: n["state"] for n in listed}["kvstore-A"] == "up"


class LoadTests:
    """load, from generated keys and from files."""

    def test_count(self, cluster: LocalCluster) -> None:
        """--count N stores N keys, readable afterwards; the summary line counts them; the bar shows 100%."""
        gw = cluster.gateway_urls[0]
        result = chash("load", "--count", "300", "--prefix", "gen:", "--size", "20", "--progress", "always", gateway=gw)
        assert result.returncode == 0, result.stderr
        err = result.stderr.decode()
        assert "300/300" in err and "100%" in err
        assert err.strip().splitlines()[-1].startswith("stored 300 keys in ")
        client = KVStoreClient(gw)
        assert client.get("gen:299") == b"gen:299:gen:299:gen:"

    def test_files(self, cluster: LocalCluster, tmp_path: Path) -> None:
        """A text file and a JSON-lines file load with their values, ttl and flags."""
        gw = cluster.gateway_urls[0]
        text = tmp_path / "keys.txt"
        text.write_bytes(b"file:a alpha beta\nfile:b\tbee\n\n")
        jsonl = tmp_path / "keys.jsonl"
        jsonl.write_text(json.dumps({"key": "file:c", "value": "sea", "flags": 4}) + "\n")
        assert chash("load", str(text), gateway=gw).returncode == 0
        assert chash("load", str(jsonl), "--format", "jsonl", gateway=gw).returncode == 0
        client = KVStoreClient(gw)
        assert client.get("file:a") == b"alpha beta" and client.get("file:b") == b"bee"
        item = client.get_item("file:c")
        assert item is not None and (item.value, item.flags) == (b"sea", 4)
        assert chash("load", "-", gateway=gw, stdin=b"file:d dee\n").returncode == 0
        assert client.get("file:d") == b"dee"

    def test_failures(self, cluster: LocalCluster, tmp_path: Path) -> None:
        """Keys the cluster refuses are counted and named, the others stored; exit 3. A missing file exits 2."""
        gw = cluster.gateway_urls[0]
        bad = tmp_path / "bad.txt"
        bad.write_bytes(b"ok:1 one\n" + b"k" * 300 + b" too-long\nok:2 two\n")
        result = chash("load", str(bad), gateway=gw)
        assert result.returncode == 3
        err = result.stderr.decode()
        assert f"{bad}:2" in err and "longer than 250" in err and "stored 2 keys" in err and "1 failed" in err
        missing = chash("load", str(tmp_path / "nope"), gateway=gw)
        assert missing.returncode == 2 and "cannot read" in one_line(missing)


class FailureTests:
    """Gateways that cannot be reached, and bad arguments."""

    def test_no_gateway(self) -> None:
        """With no gateway reachable every command exits 3 with one line naming the URL."""
        url = dead_url()
        for argv in (["get", "k"], ["put", "k", "v"], ["ring"], ["status", "--json"], ["load", "--count", "5"]):
            result = chash(*argv, gateway=url)
            assert result.returncode == 3, argv
            assert one_line(result).endswith(f"no gateway could be reached ({url}: connection refused)")

    def test_failover_flag(self, cluster: LocalCluster) -> None:
        """--gateway is repeatable, given before the subcommand, and wins over CHASH_GATEWAY."""
        gw = cluster.gateway_urls[0]
        chash("put", "cli:fo", "x", gateway=gw)
        result = chash("--gateway", dead_url(), "--gateway", gw, "get", "cli:fo", gateway=dead_url())
        assert (result.returncode, result.stdout) == (0, b"x")

    def test_bad_arguments(self, cluster: LocalCluster) -> None:
        """Bad arguments exit 2 with one line and never reach the cluster."""
        for argv in (["put"], ["get", "a", "b"], ["load"], ["nodes", "evict", "x"], ["put", "a b", "v"]):
            result = chash(*argv, gateway=cluster.gateway_urls[0])
            assert result.returncode == 2, argv
            one_line(result)


class NodeAdminTests:
    """nodes drain and nodes remove on a real node (last of the tests on the module's cluster)."""

    def test_drain_then_remove(self, cluster: LocalCluster) -> None:
        """drain marks a node leaving; remove takes it out of the map; --json may follow the action."""
        gw = cluster.gateway_urls[0]
        extra = cluster.add_kvstore(name="kvstore-X")
        drained = chash("nodes", "drain", "kvstore-X", "--json", gateway=gw, token=cluster.token)
        assert drained.returncode == 0, drained.stderr
        answer = json.loads(drained.stdout)
        assert answer["result"] == "updated" and answer["node"]["state"] == "leaving"
        extra.kill()  # so that it cannot register again once removed
        removed = chash("nodes", "remove", "kvstore-X", gateway=gw, token=cluster.token)
        assert removed.returncode == 0, removed.stderr
        assert removed.stdout.decode().startswith("kvstore-X is removed from the ring (removed, epoch ")
        listed = json.loads(chash("nodes", "--json", gateway=gw).stdout)
        assert "kvstore-X" not in {n["id"] for n in listed}


class ClusterUpTests:
    """chash cluster up."""

    def test_up_serves_and_stops(self, tmp_path: Path) -> None:
        """cluster up prints the endpoints and CHASH_GATEWAY, serves, and stops every daemon on SIGTERM."""
        env = clean_environ()
        process = subprocess.Popen(
            [sys.executable, "-m", "chashd.cli", "cluster", "up", "--gateways", "1", "--kvstores", "1"]
            + ["--data-dir", str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        try:
            assert process.stdout is not None
            gateway = None
            token_line = ""
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                line = process.stdout.readline().decode()
                if not line:
                    break
                if line.startswith("export CHASH_GATEWAY="):
                    gateway = line.strip().split("=", 1)[1]
                    token_line = process.stdout.readline().decode()
                    break
            assert gateway, "cluster up printed no CHASH_GATEWAY line"
            # The cluster's own random token, in a file only this user can read, named by an export line.
            token_file = tmp_path / "secrets" / "token"
            assert token_line.strip() == f"export CHASH_TOKEN=$(cat {token_file})"
            assert token_file.stat().st_mode & 0o777 == 0o600 and len(token_file.read_text().strip()) == 64
            assert (tmp_path / "secrets" / "raft-password").stat().st_mode & 0o777 == 0o600
            assert chash("put", "up:1", "one", gateway=gateway).returncode == 0
            assert chash("get", "up:1", gateway=gateway).stdout == b"one"
            process.send_signal(signal.SIGTERM)
            assert process.wait(90) == 0
            assert chash("get", "up:1", gateway=gateway).returncode == 3
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
