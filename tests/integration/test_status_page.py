"""The status page in a real browser: headless Chromium (Debian's package) loads ``GET /`` from a real
3-gateway cluster, and the test reads the DOM Chromium rendered after the page's script ran: the nodes,
the leader, a killed kvstore shown down, a gateway that lost its leader saying so. Screenshots of each step
are kept in the test's tmp dir (pytest keeps the last runs' dirs; the path is printed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from chashd.client import KVStoreClient
from chashd.launcher import LocalCluster, clean_environ
from chashd.screenshots import DomElements, chromium, dump_dom, screenshot
from tests.integration.conftest import wait_until

pytestmark = pytest.mark.slow

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Three gateways (probing every 0.2 s, a node down after 2 failed probes) and three kvstores."""
    if chromium() is None:
        pytest.skip(
            "the browser test of the status page needs Chromium, which is not installed and could not be "
            "installed here (./dev.sh test installs Debian's chromium package when it can)"
        )
    gateway_args = ["--probe-interval", "0.2", "--down-after", "2"]
    with LocalCluster(
        tmp_path_factory.mktemp("status-page"), gateways=3, kvstores=3, gateway_args=gateway_args, env=clean_environ()
    ) as running:
        yield running


def _page(url: str, shots: Path, name: str) -> DomElements:
    """The status page's rendered DOM, after its script refreshed <main> at least once; a screenshot too."""
    dom = DomElements(dump_dom(url + "/", budget_ms=6000))
    (main,) = dom.find("main", id="status")
    assert int(main.get("data-refreshes", "0")) >= 1, "the page's script did not refresh <main>"
    png = screenshot(url + "/", shots / f"{name}.png")
    assert png.read_bytes().startswith(PNG) and png.stat().st_size > 10_000
    print(f"screenshot: {png}")
    return dom


def test_status_page_in_chromium(cluster: LocalCluster, tmp_path: Path) -> None:
    """The page shows every node up with its arc, marks the Raft leader among the three gateways; after
    a kvstore is killed it shows that node down (row and arc); a gateway whose two peers stopped says it
    lost the leader."""
    client = KVStoreClient(cluster.gateway_urls)
    for i in range(200):
        client.put(f"page:{i}", b"v" * 20)
    leader = cluster.wait_for_leader()
    follower = next(i for i, g in enumerate(cluster.gateways) if g.name != leader)
    url = cluster.gateways[follower].url

    dom = _page(url, tmp_path, "1-all-up")
    names = {k.name for k in cluster.kvstores}
    assert {row["data-node"] for row in dom.find("tr", data_state="up")} == names
    assert {arc["data-node"] for arc in dom.find("path", **{"class": "arc state-up"})} == names
    gateways = {row["data-gateway"]: row["data-role"] for row in dom.find("tr") if "data-gateway" in row}
    assert gateways == {g.name: "leader" if g.name == leader else "follower" for g in cluster.gateways}
    assert not dom.find("p", id="leader-lost")

    victim = cluster.kvstores[1]
    victim.kill()
    wait_until(
        f"{victim.name} marked down",
        lambda: any(n["id"] == victim.name and n["state"] == "down" for n in cluster.status(follower)["nodes"]),
        timeout=60,
    )
    dom = _page(url, tmp_path, "2-node-down")
    assert [row["data-node"] for row in dom.find("tr", data_state="down")] == [victim.name]
    assert [arc["data-node"] for arc in dom.find("path", **{"class": "arc state-down"})] == [victim.name]
    assert {row["data-node"] for row in dom.find("tr", data_state="up")} == names - {victim.name}

    for i, gateway in enumerate(cluster.gateways):
        if i != follower:
            gateway.stop()
    # Alone, pysyncobj keeps naming its last leader (it holds no election without a peer): quorum is what goes.
    wait_until("the last gateway to lose its quorum", lambda: not cluster.status(follower)["has_quorum"], timeout=60)
    dom = _page(url, tmp_path, "3-leader-lost")
    assert dom.find("p", id="leader-lost")
    assert not any(row["data-role"] == "leader" for row in dom.find("tr") if "data-gateway" in row)
