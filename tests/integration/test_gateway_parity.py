"""memcached parity through real gateways: multi-key gets of any size up to --max-keys, stats, meta commands,
the differential test's cases against a real memcached, and a connection's pipelined commands acting in order.

Two clusters of real processes: one gateway over three kvstores with N=3/W=2/R=2 (the defaults), and one
gateway over two kvstores with N=1. Raw sockets, so that what is on the wire is what memcached clients see.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from chashd.launcher import LocalCluster, clean_environ
from tests.integration.conftest import wait_until
from tests.integration.test_memcache_compat import CASES, Case, run_case

pytestmark = pytest.mark.slow

TIMEOUT = 30.0


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One gateway (N=3, W=2, R=2) and three kvstores; flush_all allowed (the differential cases start with it)."""
    with LocalCluster(
        tmp_path_factory.mktemp("parity-n3"), gateways=1, kvstores=3,
        gateway_args=["--probe-interval", "0.3", "--allow-flush-all"], env=clean_environ(),
    ) as running:  # fmt: skip
        yield running


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One gateway with N=1 (W=1, R=1) and two kvstores."""
    args = ["--probe-interval", "0.3", "--replicas", "1", "--write-quorum", "1", "--read-quorum", "1"]
    with LocalCluster(
        tmp_path_factory.mktemp("parity-n1"), gateways=1, kvstores=2, gateway_args=args, env=clean_environ()
    ) as running:
        yield running


def line_port(cluster: LocalCluster) -> int:
    """The gateway's line port."""
    return cluster.line_ports[cluster.gateways[0].name]


def exchange(port: int, request: bytes, done: Callable[[bytes], bool], timeout: float = TIMEOUT) -> bytes:
    """Send ``request`` on a fresh connection and read until ``done(reply so far)``."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        deadline = time.monotonic() + timeout
        while not done(data):
            assert time.monotonic() < deadline, f"no complete reply within {timeout}s: {data[-200:]!r}"
            chunk = sock.recv(1 << 20)
            assert chunk, f"closed after {len(data)} bytes: {data[-200:]!r}"
            data += chunk
    return data


def ends(suffix: bytes) -> Callable[[bytes], bool]:
    """A ``done`` for ``exchange``: the reply ends with ``suffix``."""
    return lambda data: data.endswith(suffix)


def multi_get(cluster: LocalCluster, tag: bytes) -> None:
    """Set 2,048 keys of 250 bytes through the gateway, then get them all in one line, and a mix of hits and
    misses: every hit comes back, in request order, with its value and flags."""
    port = line_port(cluster)
    keys = [(tag + b"%06d" % i).ljust(250, b"k") for i in range(2048)]
    values = [b"v%d" % i for i in range(len(keys))]
    sets = b"".join(b"set %s %d 0 %d\r\n%s\r\n" % (k, i, len(v), v) for i, (k, v) in enumerate(zip(keys, values)))
    reply = exchange(port, sets, lambda data: data.count(b"\r\n") == len(keys))
    assert reply == b"STORED\r\n" * len(keys)
    reply = exchange(port, b"get " + b" ".join(keys) + b"\r\n", ends(b"END\r\n"))
    expected = b"".join(b"VALUE %s %d %d\r\n%s\r\n" % (k, i, len(v), v) for i, (k, v) in enumerate(zip(keys, values)))
    assert reply == expected + b"END\r\n"
    mixed = [key if i % 2 else key.replace(tag, b"~" * len(tag), 1) for i, key in enumerate(keys)]
    reply = exchange(port, b"gets " + b" ".join(mixed) + b"\r\n", ends(b"END\r\n"))
    assert reply.count(b"VALUE ") == len(keys) // 2
    assert reply.startswith(b"VALUE %s 1 2 " % keys[1])


class MultiGetTests:
    """A get of 2,048 keys of 250 bytes (the default --max-keys) through a gateway."""

    def test_replicated(self, replicated: LocalCluster) -> None:
        """With N=3 and R=2: every kvstore is asked for about two thirds of the keys, in lines it accepts."""
        multi_get(replicated, b"n3-")

    def test_single_replica(self, single: LocalCluster) -> None:
        """With N=1: each kvstore is asked for its half of the keys."""
        multi_get(single, b"n1-")

    def test_past_max_keys(self, single: LocalCluster) -> None:
        """A get of more keys than --max-keys answers memcached-style CLIENT_ERROR and the connection goes on."""
        keys = b" ".join(b"k%d" % i for i in range(2049))
        reply = exchange(line_port(single), b"get " + keys + b"\r\nversion\r\n", lambda d: d.count(b"\r\n") >= 2)
        assert reply.startswith(b"CLIENT_ERROR too many keys in one request (the limit is 2048)\r\nVERSION ")


def half_closed(port: int, request: bytes) -> bytes:
    """Send ``request``, shut the write side, and read until the server closes; everything it wrote."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert time.monotonic() < deadline, f"not closed within {TIMEOUT}s: {data[-200:]!r}"
            chunk = sock.recv(1 << 16)
            if not chunk:
                return data
            data += chunk


class HalfCloseTests:
    """A client that shuts its write side gets every reply, then the server closes (raw sockets)."""

    REQUEST = b"set hc 0 0 2\r\nhi\r\nget hc\r\nget nothing\r\ngets hc nothing\r\nversion\r\n"

    def test_gateway(self, replicated: LocalCluster) -> None:
        """Through a gateway: the replies of a pipeline, all of them, in order, then the close."""
        reply = half_closed(line_port(replicated), self.REQUEST)
        reply = re.sub(rb"VERSION [^\r]*", b"VERSION <v>", re.sub(rb"(VALUE hc 0 2) \d+", rb"\1 <cas>", reply))
        assert reply == (
            b"STORED\r\nVALUE hc 0 2\r\nhi\r\nEND\r\nEND\r\nVALUE hc 0 2 <cas>\r\nhi\r\nEND\r\nVERSION <v>\r\n"
        )

    def test_kvstore(self, replicated: LocalCluster) -> None:
        """On a kvstore's own port (a write there needs the cluster token: xauth first): the same, one get per
        read or many."""
        port = replicated.line_ports[replicated.kvstores[0].name]
        xauth = b"xauth %s\r\n" % replicated.token.encode()
        reply = half_closed(port, xauth + b"set own 0 0 1\r\nx\r\nget own\r\nget b\r\n")
        assert reply == b"OK\r\nSTORED\r\nVALUE own 0 1\r\nx\r\nEND\r\nEND\r\n"
        assert half_closed(port, b"get own\r\n") == b"VALUE own 0 1\r\nx\r\nEND\r\n"


def stats(port: int, group: bytes = b"") -> dict[str, str]:
    """The ``stats`` (or ``stats <group>``) lines of the server at ``port``."""
    request = b"stats " + group + b"\r\n" if group else b"stats\r\n"
    reply = exchange(port, request, ends(b"END\r\n"))
    return {
        line.split(b" ")[1].decode(): line.split(b" ", 2)[2].decode()
        for line in reply.split(b"\r\n")
        if line.startswith(b"STAT ")
    }


class StatsTests:
    """stats groups and admin commands on a gateway and a kvstore."""

    def test_gateway_cluster_totals(self, replicated: LocalCluster) -> None:
        """A gateway's stats add the cluster's totals, summed from every kvstore's last report."""
        port = line_port(replicated)
        exchange(
            port, b"".join(b"set total:%d 0 0 1\r\nx\r\n" % i for i in range(30)), lambda d: d.count(b"\r\n") == 30
        )

        def reported() -> dict[str, str] | None:
            figures = stats(port)
            return figures if int(figures["cluster_curr_items"]) >= 90 else None  # 30 keys, 3 replicas each

        figures = wait_until("the kvstores' reports of the 30 keys", reported)
        assert figures["cluster_nodes_reporting"] == "3"
        assert int(figures["cluster_bytes"]) > 0 and figures["cluster_limit_maxbytes"] == "0"
        assert int(figures["cmd_set"]) >= 30 and "curr_connections" in figures
        settings = stats(port, b"settings")
        assert (settings["replicas"], settings["write_quorum"], settings["read_quorum"]) == ("3", "2", "2")
        assert exchange(port, b"cache_memlimit 64\r\n", ends(b"\r\n")).startswith(b"MEMLIMIT_ADJUST_FAILED a gateway")
        assert exchange(port, b"shutdown\r\n", ends(b"\r\n")) == b"ERROR: shutdown not enabled\r\n"

    def test_kvstore_groups(self, replicated: LocalCluster) -> None:
        """A kvstore answers items, slabs, conns and cachedump with what it holds."""
        port = replicated.line_ports[replicated.kvstores[1].name]
        xauth = b"xauth %s\r\n" % replicated.token.encode()  # a write on a kvstore needs the cluster token
        exchange(port, xauth + b"set own:dump 0 0 3\r\nabc\r\n", ends(b"STORED\r\n"))
        assert int(stats(port, b"items")["items:1:number"]) >= 1
        assert stats(port, b"slabs")["active_slabs"] == "1"
        conns = stats(port, b"conns")
        assert any(name.endswith(":state") and value == "conn_parse_cmd" for name, value in conns.items())
        dump = exchange(port, b"stats cachedump 1 0\r\n", ends(b"END\r\n"))
        assert re.search(rb"^ITEM own:dump \[3 b; 0 s\]\r\n", dump, re.M)


class MapFenceTests:
    """Read-modify-writes are fenced by the cluster map's epoch on real daemons."""

    def test_kvstore_refuses_an_older_map(self, replicated: LocalCluster) -> None:
        """The gateway names its map epoch to every kvstore (``xmap``), and its incr runs; a connection that
        names an older epoch than the kvstore knows (from its ring watch and the gateway) has its xapply
        refused, saying both epochs, and nothing changes."""
        port = line_port(replicated)
        exchange(port, b"set fenced 0 0 1\r\n5\r\nincr fenced 1\r\n", ends(b"6\r\n"))
        kvstore = replicated.line_ports[replicated.kvstores[0].name]
        assert int(stats(kvstore)["cmd_xmap"]) >= 1
        version = b"%d-tester" % (int(time.time() * 1000) << 16)
        xauth = b"xauth %s\r\n" % replicated.token.encode()
        reply = exchange(kvstore, xauth + b"xmap 1\r\nxapply %s incr fenced 1\r\n" % version, ends(b"here\r\n"))
        assert re.fullmatch(
            rb"OK\r\nOK\r\nSERVER_ERROR stale cluster map: epoch 1 is older than epoch \d+ known here\r\n", reply
        )
        assert exchange(kvstore, b"get fenced\r\n", ends(b"END\r\n")) == b"VALUE fenced 0 1\r\n6\r\nEND\r\n"
        assert stats(kvstore)["xapply_stale_map"] == "1"


class MetaTests:
    """Meta commands through a gateway keep the N/W/R and version rules of the classic commands."""

    def held(self, cluster: LocalCluster, request: bytes) -> list[bytes]:
        """What each kvstore answers ``request`` on its own port (cas values as they are)."""
        ports = [cluster.line_ports[k.name] for k in cluster.kvstores]
        return [exchange(port, request + b"mn\r\n", ends(b"MN\r\n"))[:-4] for port in ports]

    def test_set_get_delete_arith(self, replicated: LocalCluster) -> None:
        """ms stores the gateway's version on every replica (the cas mg gives is that version, on each kvstore);
        ma applies at the primary and replicates; md leaves a tombstone everywhere; C compares that version."""
        port = line_port(replicated)
        reply = exchange(port, b"ms meta:a 5 T0 c\r\nhello\r\nmg meta:a v c f t\r\n", lambda d: d.count(b"\r\n") >= 3)
        stored, got = re.fullmatch(rb"HD c(\d+)\r\nVA 5 c(\d+) f0 t-1\r\nhello\r\n", reply).groups()  # type: ignore[union-attr]
        assert stored == got
        wait_until(
            "every replica holding meta:a with the gateway's version",
            lambda: self.held(replicated, b"mg meta:a v c\r\n") == [b"VA 5 c%s\r\nhello\r\n" % stored] * 3,
        )
        assert exchange(port, b"md meta:a C1\r\n", ends(b"\r\n")) == b"EX\r\n"
        assert exchange(port, b"ms meta:a 3 C%s\r\nnew\r\n" % stored, ends(b"\r\n")) == b"HD\r\n"
        assert exchange(port, b"ms meta:a 3 C%s\r\nold\r\n" % stored, ends(b"\r\n")) == b"EX\r\n"
        assert exchange(port, b"ma meta:n N0 J5 v\r\nma meta:n D10 v\r\n", lambda d: d.count(b"\r\n") == 4) == (
            b"VA 1\r\n5\r\nVA 2\r\n15\r\n"
        )
        wait_until(
            "every replica holding meta:n = 15",
            lambda: self.held(replicated, b"mg meta:n v\r\n") == [b"VA 2\r\n15\r\n"] * 3,
        )
        assert exchange(port, b"md meta:a\r\nmg meta:a v\r\n", lambda d: d.count(b"\r\n") == 2) == b"HD\r\nEN\r\n"
        wait_until("no replica answering meta:a", lambda: self.held(replicated, b"mg meta:a v\r\n") == [b"EN\r\n"] * 3)

    def test_vivify_and_noreply(self, replicated: LocalCluster) -> None:
        """mg N creates the item through the gateway (an add at the primary): the first reader wins, the next sees
        Z; q pipelines end with mn."""
        port = line_port(replicated)
        reply = exchange(port, b"mg meta:v N30 v t\r\nmg meta:v v\r\n", lambda d: d.count(b"\r\n") == 4)
        assert re.fullmatch(rb"VA 0 t(29|30) W\r\n\r\nVA 0 Z\r\n\r\n", reply), reply  # a second may pass
        reply = exchange(port, b"mg meta:x v q\r\nms meta:y 1 q\r\ny\r\nmg meta:y v q\r\nmn\r\n", ends(b"MN\r\n"))
        assert reply == b"VA 1\r\ny\r\nMN\r\n"


#: The differential test's cases, but cache_memlimit: a gateway holds no items and says so (USAGE.md).
GATEWAY_CASES = [case for case in CASES if case.name != "cache_memlimit"]


@pytest.mark.parametrize("case", GATEWAY_CASES, ids=[case.name for case in GATEWAY_CASES])
def test_same_replies_as_memcached(case: Case, memcached_port: int, replicated: LocalCluster) -> None:
    """Through a gateway with N=3/W=2/R=2, the differential test's cases (the meta commands' included) get
    memcached's replies byte for byte (cas and TTL numbers normalised, as on a kvstore)."""
    assert run_case(line_port(replicated), case) == run_case(memcached_port, case)


@pytest.mark.parametrize("name", ["replicated", "single"])
def test_pipelined_commands_on_a_key_in_order(name: str, request: pytest.FixtureRequest) -> None:
    """Commands pipelined on one connection act in order through a gateway, with N=3 and with N=1 (whose plain
    gets are forwarded to a kvstore as they are), as on one memcached: a get behind a delete misses, an incr
    behind a set counts from the value set, a get behind a meta set sees it."""
    port = line_port(request.getfixturevalue(name))
    for i in range(20):
        pipeline = (
            b"set p%d 0 0 1\r\nx\r\ndelete p%d\r\nget p%d\r\nset p%d 0 0 1\r\n5\r\nincr p%d 2\r\n"
            b"ms p%d 1\r\ny\r\nget p%d\r\n" % ((i,) * 7)
        )
        reply = exchange(port, pipeline, lambda d: d.count(b"END\r\n") == 2)
        assert reply == b"STORED\r\nDELETED\r\nEND\r\nSTORED\r\n7\r\nHD\r\nVALUE p%d 0 1\r\ny\r\nEND\r\n" % i
