"""The gateway role: the Raft-replicated cluster map and the key router.

- ``clustermap``: the cluster map as a pure state machine (nodes, states, gateways, epoch) and the view with
  its hash ring; ``raft``: its replication with pysyncobj; ``membership``: the service over it;
  ``testing``: an in-memory Raft for tests.
- ``router`` and ``connections``: the data plane; ``health`` and ``rebalance``: what the gateway watches of
  the kvstores; ``api``: the ``/ring`` routes; ``service`` and ``tap``: the wiring.
"""

__all__: list[str] = []
