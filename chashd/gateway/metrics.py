"""The gateway's own Prometheus figures, read from its Raft membership at scrape time.

chashd_raft_leader_known          1 while this gateway knows a Raft leader: it leads, or heard from the leader
                                  within its election timeout (a follower cut off from the other gateways
                                  that still names its last leader: 0, as /ring/status names none)
chashd_raft_has_quorum            1 while it reaches a majority of the gateways
chashd_raft_is_leader             1 on the leader
chashd_raft_leader_changes_total  times the leader this gateway knows changed (none counts as a change)
chashd_ring_nodes{state}          nodes of the cluster map by state (up, down, leaving)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chashd.node import NodeState

__all__ = ["GatewayCollector"]


class GatewayCollector(Collector):
    """Raft and ring figures of a ``Membership`` (its ``status``, ``view`` and ``leader_changes``)."""

    def __init__(self, membership: Any) -> None:
        self._membership = membership

    def collect(self) -> Iterator[Metric]:
        membership = self._membership
        status = membership.status
        for name, value, documentation in (
            (
                "chashd_raft_leader_known",
                status.leader is not None and status.in_contact,
                "1 while this gateway knows a Raft leader it leads or heard from within its election timeout",
            ),
            ("chashd_raft_has_quorum", status.has_quorum, "1 while this gateway reaches a majority of the gateways"),
            ("chashd_raft_is_leader", status.is_leader, "1 on the Raft leader"),
        ):
            yield GaugeMetricFamily(name, documentation, value=int(bool(value)))
        yield CounterMetricFamily(
            "chashd_raft_leader_changes",
            "Times the Raft leader this gateway knows changed",
            value=membership.leader_changes,
        )
        counts = dict.fromkeys(NodeState, 0)
        for node in membership.view.nodes:
            counts[node.state] += 1
        nodes = GaugeMetricFamily("chashd_ring_nodes", "Nodes of the cluster map by state", labels=["state"])
        for state, count in sorted(counts.items()):
            nodes.add_metric([state], count)
        yield nodes
