"""A kvstore node as the cluster knows it: its state (``NodeState``) and its address, weight and state
(``NodeInfo``), one type wherever a node is named.

The gateway's cluster map (``chashd.gateway.clustermap``) holds ``NodeInfo`` values and its HTTP API shows
them (``to_dict``); a kvstore reads them back from ``GET /ring`` (``from_dict``, in
``chashd.kvstore.placement``) to find the nodes it hands data to; the gateway's connections follow them; the
command line, the launcher and the demo compare the states they read in JSON with ``NodeState``.

Pure: no Twisted, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = ["NodeInfo", "NodeState"]


class NodeState(StrEnum):
    """A kvstore node's state in the map (its JSON form is the value)."""

    #: Serves its share of the ring.
    UP = "up"
    #: Stopped answering: keeps its arcs, routing skips it for reads, writes go to the other replicas.
    DOWN = "down"
    #: Draining: owns nothing new, still readable until its handoff finished, then removed.
    LEAVING = "leaving"


@dataclass(frozen=True)
class NodeInfo:
    """A kvstore node: where it listens (``host``, HTTP ``port``, ``line_port``), its weight, its state and
    the sequence number of its last announcement."""

    id: str
    host: str
    port: int
    line_port: int
    weight: int
    state: NodeState = NodeState.UP
    seq: int = 0

    def url(self, scheme: str = "http") -> str:
        """The base URL of the node's HTTP API (an IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "id": self.id,
            "host": self.host,
            "port": self.port,
            "line_port": self.line_port,
            "weight": self.weight,
            "state": self.state.value,
            "seq": self.seq,
        }

    @classmethod
    def from_dict(cls, item: Mapping[str, Any]) -> NodeInfo:
        """Read ``to_dict()``'s form (``seq`` may be missing: ``GET /ring`` leaves it out); ``ValueError``
        naming what is wrong otherwise."""
        node_id = item.get("id")
        if not isinstance(node_id, str) or not node_id:
            raise ValueError(f"node {item!r} has no id")
        host = item.get("host")
        if not isinstance(host, str) or not host:
            raise ValueError(f"node {node_id!r} has no host")
        numbers = {
            name: item.get(name, 0 if name == "seq" else None) for name in ("port", "line_port", "weight", "seq")
        }
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"node {node_id!r}: {name} {value!r} is not a non-negative integer")
        try:
            state = NodeState(item.get("state", NodeState.UP))
        except ValueError:
            raise ValueError(f"node {node_id!r}: unknown state {item.get('state')!r}") from None
        return cls(node_id, host, numbers["port"], numbers["line_port"], numbers["weight"], state, numbers["seq"])
