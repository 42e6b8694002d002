"""The ring as a picture (chashd.ringsvg): every arc in its owner's colour, states and shares in the legend."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from chashd.ring import HASH_SPACE, HashRing
from chashd.ringsvg import _owned_arcs, node_colours, ring_svg

SVG = "{http://www.w3.org/2000/svg}"


def _parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


class OwnedArcsTests(SynchronousTestCase):
    """The arcs drawn are exactly the ring's ownership."""

    @settings(max_examples=30, deadline=None)
    @given(st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=6, unique=True), st.integers(4, 40))
    def test_arcs_cover_the_circle_once_and_match_owners(self, nodes: list[str], points: int) -> None:
        """The arcs add up to the whole hash space, and the middle of each arc is owned by the arc's node."""
        ring = HashRing(dict.fromkeys(nodes, 100), points_per_node=points * 4)
        arcs = _owned_arcs(ring)
        assert set(arcs) == set(nodes)
        assert sum(end - start for spans in arcs.values() for start, end in spans) == HASH_SPACE
        for node, spans in arcs.items():
            for start, end in spans:
                assert end > start
                middle = (start + (end - start) // 2) % HASH_SPACE
                assert ring.node_for_hash(middle) == node
                assert ring.node_for_hash(end % HASH_SPACE) == node

    def test_one_node_is_the_whole_circle(self) -> None:
        """A ring of one node is one arc around the whole circle."""
        arcs = _owned_arcs(HashRing({"solo": 100}))
        ((start, end),) = arcs["solo"]
        assert end - start == HASH_SPACE

    def test_empty_ring(self) -> None:
        """An empty ring has no arcs and still draws (the circle, the epoch)."""
        assert _owned_arcs(HashRing({})) == {}
        root = _parse(ring_svg(HashRing({}, epoch=3)))
        assert root.get("data-epoch") == "3"
        assert root.findall(f"{SVG}path") == []


class RingSVGTests(SynchronousTestCase):
    """The SVG document."""

    def setUp(self) -> None:
        self.ring = HashRing({"kv-a": 100, "kv-b": 100, "kv-c": 200}, epoch=9)
        self.states = {"kv-a": "up", "kv-b": "down", "kv-c": "up", "kv-d": "leaving"}
        self.root = _parse(ring_svg(self.ring, self.states))

    def test_one_path_per_node_in_its_colour(self) -> None:
        """Each node in the ring has one arc path, stroked in its own colour; the colours differ."""
        paths = {p.get("data-node"): p for p in self.root.findall(f"{SVG}path") if p.get("data-node")}
        assert set(paths) == {"kv-a", "kv-b", "kv-c"}
        colours = node_colours(["kv-a", "kv-b", "kv-c", "kv-d"])
        assert {node: p.get("stroke") for node, p in paths.items()} == {n: colours[str(n)] for n in paths}
        assert len(set(colours.values())) == 4
        assert node_colours(["kv-d", "kv-a", "kv-a", "kv-c", "kv-b"]) == colours  # duplicates change nothing
        # kv-c has twice the weight: about twice as many arcs as kv-a.
        count = {node: len(re.findall("M", p.get("d", ""))) for node, p in paths.items()}
        assert count["kv-c"] > count["kv-a"]

    def test_states(self) -> None:
        """A down node's arcs are pale; its class names the state."""
        paths = {p.get("data-node"): p for p in self.root.findall(f"{SVG}path") if p.get("data-node")}
        assert paths["kv-b"].get("class") == "arc state-down" and paths["kv-b"].get("stroke-opacity") == "0.3"
        assert paths["kv-a"].get("class") == "arc state-up" and paths["kv-a"].get("stroke-opacity") is None

    def test_legend(self) -> None:
        """The legend lists every node, the leaving one out of the ring included, with state and share."""
        legend = {g.get("data-node"): g for g in self.root.findall(f"{SVG}g")}
        assert set(legend) == {"kv-a", "kv-b", "kv-c", "kv-d"}
        shares = self.ring.shares()
        text = {node: "".join(g.itertext()) for node, g in legend.items()}
        assert text["kv-c"] == f"kv-c · up · {100 * shares['kv-c']:.1f}%"
        assert text["kv-b"].startswith("kv-b · down · ")
        assert text["kv-d"] == "kv-d · leaving · not in ring"
        assert legend["kv-d"].get("data-state") == "leaving"

    def test_title_escaped(self) -> None:
        """A title is escaped, and the document parses as XML with it."""
        root = _parse(ring_svg(self.ring, title="<ring> & co"))
        assert root.find(f"{SVG}title").text == "<ring> & co"  # type: ignore[union-attr]

    def test_same_ring_same_picture(self) -> None:
        """Two gateways (or a gateway and chash ring --svg) draw the same ring byte for byte."""
        again = HashRing({"kv-c": 200, "kv-b": 100, "kv-a": 100}, epoch=9)
        assert ring_svg(again, self.states) == ring_svg(self.ring, self.states)
