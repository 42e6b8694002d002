"""TLS between daemons (SECURITY.md, "What is encrypted"): a throwaway CA made here with ``cryptography`` signs one
certificate for 127.0.0.1; a gateway and kvstores listen with ``ssl:`` endpoints and verify each other against the
CA (``--tls-ca``). Registration and the ring watch (kvstores to the gateway's HTTPS port), the gateway's links
and health probes (to the kvstores' TLS line and HTTP ports) and the handoff (kvstore to kvstore) all run over
TLS, and a plain-TCP client gets nothing from a kvstore's line port."""

from __future__ import annotations

import json
import socket
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymemcache.client.base import Client

from chashd.launcher import ClusterSecrets, Daemon, clean_environ, free_ports
from tests.certs import make_ca
from tests.integration.conftest import wait_until

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"


class TLSCluster:
    """One gateway (HTTPS API, plain line port for clients) and kvstores whose ports are all TLS."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ca, cert, key = make_ca(workdir, HOST)
        self.tls = f"privateKey={key}:certKey={cert}"
        self.secrets = ClusterSecrets.generate()
        self.files = self.secrets.write(workdir / "secrets")
        self.context = ssl.create_default_context(cafile=str(self.ca))
        self.daemons: list[Daemon] = []
        self.line_ports: dict[str, int] = {}
        http, raft, line = free_ports(3)
        self.gateway_url = f"https://{HOST}:{http}"
        self.client_port = line
        args = [
            "--gateway-id", "gateway-1",
            "--port", f"ssl:{http}:interface={HOST}:{self.tls}",
            "--line-port", f"tcp:{line}:interface={HOST}",
            "--raft-port", str(raft), "--advertise-host", HOST, "--peers", f"{HOST}:{raft}",
            "--data-dir", str(workdir / "gateway-1"),
            "--raft-password-file", str(self.files["raft-password"]), "--token-file", str(self.files["token"]),
            "--tls-ca", str(self.ca), "--probe-interval", "0.5",
        ]  # fmt: skip
        self._start("chash-gateway", "gateway-1", args, http)

    def _start(self, role: str, name: str, args: list[str], http: int) -> Daemon:
        daemon = Daemon(role, name, args, http, self.workdir / f"{name}.log", env=clean_environ())
        self.daemons.append(daemon.start())
        return daemon

    def get(self, url: str) -> Any:
        """The JSON body of an HTTPS GET verified against the CA (None when it does not answer 200)."""
        try:
            with urllib.request.urlopen(url, timeout=2, context=self.context) as response:
                return json.loads(response.read()) if response.status == 200 else None
        except OSError:
            return None

    def add_kvstore(self, name: str) -> None:
        """A kvstore with TLS on both ports, registered with the gateway's HTTPS URL."""
        http, line = free_ports(2)
        args = [
            "--node-id", name, "--engine", "memory",
            "--port", f"ssl:{http}:interface={HOST}:{self.tls}",
            "--line-port", f"ssl:{line}:interface={HOST}:{self.tls}",
            "--advertise-host", HOST, "--gateway", self.gateway_url,
            "--token-file", str(self.files["token"]), "--tls-ca", str(self.ca),
        ]  # fmt: skip
        self.line_ports[name] = line
        self._start("chash-kvstore", name, args, http)

    def nodes_up(self) -> set[str]:
        """The kvstores the gateway's map holds up."""
        ring = self.get(self.gateway_url + "/ring") or {}
        return {n["id"] for n in ring.get("nodes", []) if n.get("state") == "up"}

    def xget(self, name: str, key: bytes, tls: bool = True) -> bytes:
        """What a kvstore's line port answers to ``xauth`` then ``xget key`` (over TLS verified against the CA,
        or over plain TCP)."""
        raw = socket.create_connection((HOST, self.line_ports[name]), timeout=5)
        sock = self.context.wrap_socket(raw, server_hostname=HOST) if tls else raw
        with sock:
            sock.sendall(b"xauth %s\r\nxget %s\r\n" % (self.secrets.token.encode(), key))
            reply = b""
            try:
                while not reply.endswith(b"END\r\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
            except OSError:
                pass
        return reply

    def stop(self) -> None:
        """Stop every daemon, kvstores first."""
        for daemon in reversed(self.daemons):
            daemon.stop(10)


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSCluster]:
    """The gateway with two kvstores up, all links in TLS."""
    cluster = TLSCluster(tmp_path_factory.mktemp("tls"))
    try:
        wait_until("the gateway to answer over HTTPS", lambda: cluster.get(cluster.gateway_url + "/health"), 60)
        for name in ("kvstore-A", "kvstore-B"):
            cluster.add_kvstore(name)
        wait_until("both kvstores up in the ring", lambda: cluster.nodes_up() == {"kvstore-A", "kvstore-B"}, 60)
        yield cluster
    finally:
        cluster.stop()


class TLSLinkTests:
    """Every link between daemons of a TLS cluster works, and carries TLS."""

    def test_keys_travel_over_tls_links(self, tls_cluster: TLSCluster) -> None:
        """Writes through the gateway reach both kvstores over TLS; a third kvstore gets every key by the
        handoff (kvstore to kvstore over TLS); a plain-TCP client of a kvstore's line port gets no answer."""
        mc = Client((HOST, tls_cluster.client_port), timeout=10, connect_timeout=10)
        keys = [b"tls:%d" % i for i in range(40)]
        for key in keys:
            assert mc.set(key, b"over tls " + key)
        assert mc.get(b"tls:7") == b"over tls tls:7"
        for name in ("kvstore-A", "kvstore-B"):
            assert tls_cluster.xget(name, b"tls:7").startswith(b"OK\r\nXVALUE tls:7 ")
        assert b"XVALUE" not in tls_cluster.xget("kvstore-A", b"tls:7", tls=False)
        tls_cluster.add_kvstore("kvstore-C")  # N=3 over three nodes: every key moves to it
        wait_until("kvstore-C up", lambda: "kvstore-C" in tls_cluster.nodes_up(), 60)
        wait_until(
            "the handoff to copy every key to kvstore-C",
            lambda: all(b"XVALUE" in tls_cluster.xget("kvstore-C", key) for key in keys),
            90,
        )
        assert mc.get(b"tls:39") == b"over tls tls:39"
        # The gateway's health probes reach the kvstores' HTTPS ports: none was marked down meanwhile.
        assert tls_cluster.nodes_up() == {"kvstore-A", "kvstore-B", "kvstore-C"}
        mc.close()
