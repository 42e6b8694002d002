"""The ring drawn as a circle: one SVG picture for the gateway's status page and ``chash ring --svg``.

The hash space 0 .. 2**32 runs clockwise from the top. Each ketama point ends an arc that belongs to the
point's node (a key hashes to the first point at or after it), so every node's arcs are drawn in its own
colour, one ``<path class="arc" data-node="...">`` per node holding all of them. A node that is down is
drawn pale, a leaving one hatched. A legend lists each node with its state and share of the hash space; the
centre says the epoch. Pure (L0): a ring and the nodes' states in, text out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from html import escape

from chashd.node import NodeState
from chashd.ring import HASH_SPACE, HashRing

__all__ = ["PALETTE", "node_colours", "ring_svg"]

#: Okabe and Ito's colour-blind safe palette (black left out), then Tableau's for larger rings.
PALETTE = (
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
    "#4E79A7", "#F28E2B", "#59A14F", "#B07AA1", "#76B7B2", "#FF9DA7", "#9C755F", "#EDC948",
)  # fmt: skip
_LEGEND_ROW = 22


def node_colours(nodes: Iterable[str]) -> dict[str, str]:
    """A colour for each distinct node, by the nodes' sorted order (the same on every gateway and in every file)."""
    return {node: PALETTE[i % len(PALETTE)] for i, node in enumerate(sorted(set(nodes)))}


def _point(cx: float, cy: float, r: float, hash_value: int) -> tuple[float, float]:
    angle = 2 * math.pi * hash_value / HASH_SPACE
    return cx + r * math.sin(angle), cy - r * math.cos(angle)


def _arc(cx: float, cy: float, r: float, start: int, end: int) -> str:
    """The path commands of the arc from ``start`` to ``end`` (hash values, clockwise, end > start)."""
    if end - start >= HASH_SPACE:  # the whole circle: two halves
        half = start + HASH_SPACE // 2
        return _arc(cx, cy, r, start, half) + _arc(cx, cy, r, half, start + HASH_SPACE)
    x1, y1 = _point(cx, cy, r, start)
    x2, y2 = _point(cx, cy, r, end)
    large = 1 if end - start > HASH_SPACE // 2 else 0
    return f"M{x1:.2f} {y1:.2f}A{r} {r} 0 {large} 1 {x2:.2f} {y2:.2f}"


def _owned_arcs(ring: HashRing) -> dict[str, list[tuple[int, int]]]:
    """Each node's arcs as ``(start, end)`` hash values (end may pass 2**32 for the arc across the top);
    neighbouring arcs of one node merged."""
    points = ring.points()
    arcs: dict[str, list[tuple[int, int]]] = {node: [] for node in ring.nodes}
    if not points:
        return arcs
    previous = points[-1][0] - HASH_SPACE
    runs: list[tuple[int, int, str]] = []
    for point, owner in points:
        if runs and runs[-1][2] == owner:
            runs[-1] = (runs[-1][0], point, owner)
        elif point > previous:
            runs.append((previous, point, owner))
        previous = point
    if len(runs) > 1 and runs[0][2] == runs[-1][2]:  # the last run goes on across the top into the first
        start, _, owner = runs.pop()
        runs[0] = (start - HASH_SPACE, runs[0][1], owner)
    for start, end, owner in runs:
        arcs[owner].append((start, end))
    return arcs


def ring_svg(
    ring: HashRing,
    states: Mapping[str, str] | None = None,
    title: str | None = None,
    size: int = 320,
) -> str:
    """A standalone SVG document of ``ring``; ``states`` maps node ids to ``up``, ``down`` or ``leaving``
    (also nodes no longer in the ring, which the legend lists with no share)."""
    states = dict(states or {})
    in_ring = list(ring.nodes)
    listed = sorted(set(in_ring) | set(states))
    colours = node_colours(listed)
    shares = ring.shares()
    arcs = _owned_arcs(ring)
    cx = cy = size / 2
    r = size / 2 - 24
    legend_x = size + 16
    width = legend_x + 250
    height = max(size, 40 + _LEGEND_ROW * len(listed))
    label = title or f"ring at epoch {ring.epoch}: {len(in_ring)} node(s)"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="ring" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" data-epoch="{ring.epoch}" '
        'font-family="DejaVu Sans, Verdana, sans-serif" font-size="13">',
        f"<title>{escape(label)}</title>",
        '<defs><pattern id="leaving" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="3" height="6" fill="#888"/></pattern></defs>',
        f'<circle cx="{cx}" cy="{cy}" r="{r}" fill="none" stroke="#ddd" stroke-width="28"/>',
    ]
    for node in sorted(arcs):
        d = "".join(_arc(cx, cy, r, start, end) for start, end in arcs[node])
        if not d:
            continue
        state = states.get(node, NodeState.UP)
        opacity = ' stroke-opacity="0.3"' if state == NodeState.DOWN else ""
        parts.append(
            f'<path class="arc state-{escape(state)}" data-node="{escape(node)}" d="{d}" fill="none" '
            f'stroke="{colours[node]}" stroke-width="28"{opacity}/>'
        )
        if state == NodeState.LEAVING:
            parts.append(f'<path d="{d}" fill="none" stroke="url(#leaving)" stroke-width="28" opacity="0.6"/>')
    parts.append(f'<text x="{cx}" y="{cy - 4}" text-anchor="middle" font-size="20">epoch {ring.epoch}</text>')
    parts.append(
        f'<text x="{cx}" y="{cy + 18}" text-anchor="middle" fill="#555">{len(in_ring)} node(s) in the ring</text>'
    )
    for i, node in enumerate(listed):
        y = 24 + i * _LEGEND_ROW
        state = states.get(node, NodeState.UP)
        share = f"{100 * shares[node]:.1f}%" if node in shares else "not in ring"
        faded = ' fill-opacity="0.3"' if state == NodeState.DOWN else ""
        parts.append(
            f'<g class="legend" data-node="{escape(node)}" data-state="{escape(state)}">'
            f'<rect x="{legend_x}" y="{y - 12}" width="14" height="14" fill="{colours[node]}"'
            f"{faded}/>"
            f'<text x="{legend_x + 22}" y="{y}">{escape(node)} · {escape(state)} · {share}</text></g>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
