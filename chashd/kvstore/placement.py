"""The ring as a kvstore knows it, and the saved copy of the ring its data conforms to.

``RingUpdate`` is one epoch of the cluster map as a kvstore needs it: the ring of the nodes that own arcs,
the replication factor N of that ring, and where each node listens (``chashd.node.NodeInfo``). The ring watch
(``chashd.kvstore.ringwatch``) reads one from each answer of ``GET /ring`` (``RingUpdate.from_json``); the
handoff (``chashd.kvstore.handoff``) moves data from one to another.

``save_synced(path, update)`` keeps the ring a node's data conforms to across restarts, as one JSON object
``{"version": 1, "replicas": N, "ring": HashRing.to_dict()}`` (the addresses are not kept: the next ring
brings them). The file is written anew, synced to disk and renamed over the old one, so that a crash leaves
either the old ring or the new one. ``load_synced(path)`` reads it back: None when there is no file,
``ValueError`` for a file that does not hold a saved ring. Both block on the disk: call them from a thread.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from chashd.node import NodeInfo
from chashd.ring import HashRing

__all__ = ["RingUpdate", "load_synced", "save_synced"]

#: The format of the saved ring; a file of another version is not read.
STATE_VERSION = 1


@dataclass(frozen=True)
class RingUpdate:
    """One epoch of the cluster map as a kvstore needs it.

    ``ring`` holds the nodes that own arcs (``up`` and ``down``); ``replicas`` is the replication factor N
    of that ring (the gateway's ``--replicas`` capped at the ring's size); ``nodes`` gives the address of
    every node of the ring, ``leaving`` that of the nodes being drained.
    """

    ring: HashRing
    replicas: int
    nodes: Mapping[str, NodeInfo] = field(default_factory=dict)
    leaving: Mapping[str, NodeInfo] = field(default_factory=dict)

    @property
    def epoch(self) -> int:
        """The epoch of the cluster map."""
        return self.ring.epoch

    def same_placement(self, other: RingUpdate) -> bool:
        """True when both place every replica of every key on the same nodes."""
        return self.replicas == other.replicas and self.ring.same_placement(other.ring)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> RingUpdate:
        """Read the body of ``GET /ring``; ``ValueError`` for one that does not make a ring."""
        ring = HashRing.from_dict(body)
        replicas = _replicas(body.get("replicas", 1), "malformed ring")
        return cls(
            ring,
            replicas,
            MappingProxyType(_addresses(body.get("nodes", []))),
            MappingProxyType(_addresses(body.get("leaving", []))),
        )


def _replicas(value: object, context: str) -> int:
    """``value`` as a replication factor: a positive integer, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{context}: replicas {value!r} is not a positive integer")
    return value


def _addresses(items: object) -> dict[str, NodeInfo]:
    if not isinstance(items, list):
        raise ValueError("malformed ring: a node list is not a list")
    found = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise ValueError(f"malformed ring: node {item!r}")
        if "host" not in item or "line_port" not in item:
            continue  # a node without an address: nothing can be sent to it
        try:
            found[item["id"]] = NodeInfo.from_dict(item)
        except ValueError as e:
            raise ValueError(f"malformed ring: {e}") from None
    return found


def save_synced(path: str, update: RingUpdate) -> None:
    """Write ``update``'s ring and N to ``path`` (a new file renamed over the old one, synced to disk)."""
    body = {"version": STATE_VERSION, "replicas": update.replicas, "ring": update.ring.to_dict()}
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(body, f, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def load_synced(path: str) -> RingUpdate | None:
    """The ring saved at ``path``; None when there is no file. ``ValueError`` for a file that is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            body = json.load(f)
    except FileNotFoundError:
        return None
    if not isinstance(body, dict) or body.get("version") != STATE_VERSION or not isinstance(body.get("ring"), dict):
        raise ValueError(f"{path} does not hold a saved ring of version {STATE_VERSION}")
    return RingUpdate(HashRing.from_dict(body["ring"]), _replicas(body.get("replicas"), path))
