"""The gateway's status page (chashd.gateway.statuspage) through StubTreq, over the real ring API, a real
Membership and the real state machine (LocalRaft), as the gateway's RingRoot serves it."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

from treq.testing import StubTreq

from chashd.gateway.api import RingRoot
from chashd.gateway.raft import RaftStatus
from chashd.gateway.statuspage import StatusPage
from chashd.web import KeyValueHTTP
from tests.unit.test_ring_api import BASE, RingAPITestsBase


def _rows(html: str, table: str) -> dict[str, str]:
    """The rows of ``<table id=table>`` by their data-node / data-gateway / data-counter value."""
    body = html.split(f'<table id="{table}">', 1)[1].split("</table>", 1)[0]
    return dict(re.findall(r'<tr data-(?:node|gateway|counter)="([^"]+)"(.*?)</tr>', body))


class StatusPageTests(RingAPITestsBase):
    """GET / and /status/* on a gateway with two kvstores."""

    def setUp(self) -> None:
        super().setUp()
        self.register(node_id="kv-a")
        self.register(node_id="kv-b", port=8081)
        self.extra = {
            "rebalancing": False,
            "nodes": [
                {**n.to_dict(), "keys": 10 * (i + 1), "handoff": {"synced_epoch": 2, "target_epoch": 3,
                                                                  "running": i == 0, "arcs_done": 1,
                                                                  "arcs_total": 4, "pending": 7}}
                for i, n in enumerate(self.membership.view.nodes)
            ],
        }  # fmt: skip
        self.counters: dict[str, Any] = {"cmd_get": 100, "cmd_set": 20, "quorum_failures": 1, "http_client_errors": 4}
        self.page = StatusPage(
            self.api.status_body, lambda: self.membership.view.ring, lambda: self.counters, self.clock
        )
        http = KeyValueHTTP(health=lambda: {"role": "gateway"})
        self.stub = StubTreq(RingRoot(self.api.resource(), http.resource(), self.page.resource()))

    def fetch(self, path: str, method: str = "GET") -> tuple[int, dict[str, str], str]:
        """Request ``path``: (status, headers, body text)."""
        d = self.stub.request(method, BASE + path)
        self.stub.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(self.stub.content(response))
        heads = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
        return response.code, heads, content.decode()

    def test_page(self) -> None:
        """GET / is one HTML page with the ring (an arc per node), the nodes, the gateway as leader, epoch and
        N/W/R, and no asset from elsewhere."""
        code, headers, html = self.fetch("/")
        assert code == 200 and headers["content-type"] == "text/html; charset=utf-8"
        assert "<svg" in html and html.count('class="arc state-up"') == 2
        assert f'<b id="epoch">{self.membership.view.epoch}</b>' in html
        assert '<b id="leader">g1</b>' in html and "N=2 W=2 R=2" in html
        nodes = _rows(html, "nodes")
        assert set(nodes) == {"kv-a", "kv-b"}
        assert 'data-state="up"' in nodes["kv-a"] and "127.0.0.1:8080" in nodes["kv-a"]
        assert (
            '<td class="number keys">10</td>' in nodes["kv-a"]
            and "moving: 1/4 arcs, 7 records pending" in nodes["kv-a"]
        )
        assert "waiting for epoch 3" in nodes["kv-b"]
        gateways = _rows(html, "gateways")
        assert set(gateways) == {"g1"} and 'data-role="leader"' in gateways["g1"] and "★ leader" in gateways["g1"]
        assert "leader-lost" not in html
        # Its own files only: every src/href is a path on this gateway, a gateway's URL in the table, or the
        # empty data: icon (so that the browser asks for no /favicon.ico).
        assert not re.search(r'(?:src|href)="(?!/|http://127\.0\.0\.1:|data:,")', html)
        assert '<script src="/status/refresh.js" defer></script>' in html

    def test_shares_and_colours_match_the_ring(self) -> None:
        """The share column is the ring's share of each node; its swatch has the colour of its arcs."""
        _, _, html = self.fetch("/")
        shares = self.membership.view.ring.shares()
        for node_id, row in _rows(html, "nodes").items():
            assert f'<td class="number share">{100 * shares[node_id]:.1f}%</td>' in row
            (arc_colour,) = re.findall(f'data-node="{node_id}" d="[^"]*" fill="none" stroke="([^"]+)"', html)
            assert f'fill="{arc_colour}"' in row

    def test_down_node(self) -> None:
        """A node marked down shows as down in the table and pale in the ring."""
        self.successResultOf(self.membership.mark_down("kv-b"))
        self.extra["nodes"] = [n.to_dict() for n in self.membership.view.nodes]
        _, _, html = self.fetch("/status/main")
        assert 'data-state="down"' in _rows(html, "nodes")["kv-b"]
        assert 'class="arc state-down" data-node="kv-b"' in html

    def test_leader_lost(self) -> None:
        """Without a Raft leader the page says so at the top, with the time it first saw it; the banner goes
        once a leader is back."""
        self.rafts[0].elect(None)
        self.clock.advance(3600)
        _, _, html = self.fetch("/status/main")
        assert '<p id="leader-lost" class="alert">This gateway knows no Raft leader since 01:00:' in html
        assert '<b id="leader">none</b>' in html
        self.clock.advance(60)
        _, _, html = self.fetch("/status/main")
        assert "since 01:00:" in html  # still the first time it saw no leader
        self.rafts[0].elect(self.rafts[0].settings.self_address)
        _, _, html = self.fetch("/status/main")
        assert "leader-lost" not in html and '<b id="leader">g1</b>' in html

    def test_quorum_lost(self) -> None:
        """A gateway that still names a leader but reaches no majority (an isolated pysyncobj follower keeps
        its last leader) says the leader is out of reach and marks no gateway as leader."""
        self.rafts[0].listener.on_status(RaftStatus(self.rafts[0].settings.self_address, False, has_quorum=False))
        _, _, html = self.fetch("/status/main")
        assert "reaches no majority of the gateways (its last leader, g1," in html and '<b id="leader">none</b>' in html
        assert 'data-role="leader"' not in html

    def test_leader_not_heard_from(self) -> None:
        """A follower that counts a quorum of connections (pysyncobj keeps a cut link up until it times out)
        but has not heard from its leader within the election timeout marks no gateway as leader either."""
        address = self.rafts[0].settings.self_address
        self.rafts[0].listener.on_status(RaftStatus(address, False, has_quorum=True, in_contact=False))
        _, _, html = self.fetch("/status/main")
        assert "reaches no majority of the gateways (its last leader, g1," in html and '<b id="leader">none</b>' in html

    def test_rates(self) -> None:
        """Totals at once; per-second rates from the second rendering a second or more later on."""
        _, _, html = self.fetch("/status/main")
        rows = _rows(html, "requests")
        assert '<td class="number total">100</td>' in rows["cmd_get"] and "—" in rows["cmd_get"]
        self.clock.advance(5)
        self.counters["cmd_get"] = 150
        self.counters["quorum_failures"] = 6
        _, _, html = self.fetch("/status/main")
        rows = _rows(html, "requests")
        assert '<td class="number rate">10.0</td>' in rows["cmd_get"]
        assert '<td class="number rate">1.0</td>' in rows["quorum_failures"]
        assert '<td class="number rate">0.0</td>' in rows["cmd_set"]
        assert '<td class="number total">4</td>' in rows["http_client_errors"]
        assert "over the last 5 s" in html
        assert '<td class="number total">—</td>' in rows["line_client_errors"]  # not given: shown as unknown

    def test_rate_window(self) -> None:
        """Samples older than the window are dropped, and a sample is kept at most once a second."""
        for _ in range(100):
            self.fetch("/status/main")
            self.clock.advance(0.5)
        assert len(self.page._samples) <= self.page.rate_window + 1

    def test_security_headers(self) -> None:
        """Every status route keeps the browser to this gateway's own files and caches nothing."""
        for path in ("/", "/status/main", "/status/style.css", "/status/refresh.js", "/status/ring.svg"):
            code, headers, _ = self.fetch(path)
            assert code == 200, path
            assert "default-src 'none'" in headers["content-security-policy"]
            assert headers["x-content-type-options"] == "nosniff" and headers["cache-control"] == "no-store"

    def test_static_files(self) -> None:
        """The style sheet and the script are served with their types; the script fetches /status/main."""
        _, headers, css = self.fetch("/status/style.css")
        assert headers["content-type"].startswith("text/css") and "table" in css
        _, headers, script = self.fetch("/status/refresh.js")
        assert headers["content-type"].startswith("text/javascript") and 'fetch("/status/main"' in script

    def test_ring_svg(self) -> None:
        """/status/ring.svg is a standalone SVG document of the current ring."""
        code, headers, svg = self.fetch("/status/ring.svg")
        assert code == 200 and headers["content-type"] == "image/svg+xml"
        root = ET.fromstring(svg)
        assert root.get("data-epoch") == str(self.membership.view.epoch)

    def test_head_and_other_routes(self) -> None:
        """HEAD / answers without a body; /ring still goes to the ring API and /health to the key-value surface."""
        code, _, body = self.fetch("/", "HEAD")
        assert code == 200 and body == ""
        assert self.fetch("/ring/status")[0] == 200
        assert '"role": "gateway"' in self.fetch("/health")[2]
        assert self.fetch("/status/nothing")[0] == 404
        assert self.fetch("/", "POST")[0] == 405
