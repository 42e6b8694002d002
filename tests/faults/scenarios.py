"""Known ways to lose or corrupt data, each a deterministic run of the harness (regression scenarios).

``rmw-stale-primary``: a kvstore killed long enough to be marked down misses writes
to keys whose primary it is; once it is back and marked up, the read-modify-write commands go to it and it
applies them to what it alone holds. Checked: the ``rmw`` answers (``delete``, ``add``, ``incr``) against
the acknowledged history. Replication is only reported here (catching the node up is anti-entropy's part).

``removed-restart``: a kvstore killed until ``--dead-after`` removes it from the ring
restarts while its ring watch polls a gateway that cannot reach the other gateways (so it learns the ring
without itself, and not the newer one its registration through another gateway makes) for ~30 s, and while
its own connections to one peer are cut for the first 10 s (so its handoff for the ring without itself is
still under way when its peers push its arcs back to it for the newer ring). Checked: every key is on N
replicas once the cluster settles. (A slow watch alone shows it in some runs; the cut peer makes the timing
deterministic.)

``split-primary`` (found by a seeded run: seed 5, 120 s of every fault, right after a killed kvstore was
marked up again): gateways whose maps disagree for a moment on a node's state send a read-modify-write of one
key to two different primaries; a gateway cut from the others makes the moment last. Checked: concurrent
increments through both never answer the same number and none is lost (since a gateway that hears from no
Raft leader refuses read-modify-writes, the cut gateway's increments are refused); the cut gateway names no
leader and refuses a membership change with a 503 that says why.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from chashd.client import ChashError, KVStoreClient
from chashd.launcher import Daemon
from tests.faults.checker import Report, Violation
from tests.faults.clients import Session
from tests.faults.cluster import FaultCluster, poll_until
from tests.faults.runner import Run

__all__ = ["SCENARIOS"]


def _keys_with_primary(cluster: FaultCluster, node: str, count: int, prefix: str) -> list[str]:
    view = cluster.ring_view()
    keys = []
    for i in range(100 * count):
        key = f"{prefix}{i}"
        if view.preference(key)[0] == node:
            keys.append(key)
            if len(keys) == count:
                return keys
    raise RuntimeError(f"fewer than {count} keys of {prefix}* have {node} as primary")


def _state_everywhere(cluster: FaultCluster, node: str, state: str | None) -> bool:
    """True when every gateway's map gives ``node`` the state ``state`` (None: not in the map)."""
    for gateway in cluster.gateways:
        nodes = cluster.ring_nodes(gateway)
        if nodes is None or nodes.get(node) != state:
            return False
    return True


def _until(run: Run, what: str, check: Callable[[], object], timeout: float = 90.0) -> None:
    poll_until(what, check, timeout, 0.3)
    run.log(f"{run.recorder.now():7.1f}s {what}")


def _write_acknowledged(run: Run, items: Sequence[tuple[str, str]], tries: int = 20) -> None:
    """Set each key to its value through the gateways in turn until one set of it is acknowledged."""
    sessions = [run.session("w0", i) for i in range(3)]
    try:
        for i, (key, value) in enumerate(items):
            for attempt in range(tries):
                if sessions[(i + attempt) % 3].run("set", key, value).result == "STORED":
                    break
            else:
                raise RuntimeError(f"no set of {key} was acknowledged in {tries} tries")
    finally:
        for session in sessions:
            session.close()


def rmw_at_stale_primary(run: Run) -> Report:
    """Scenario 1: read-modify-write commands at a primary that missed writes."""
    run.args.report = "under-replicated"
    cluster = run.start_cluster(kvstores=4, gateway_args=run.gateway_args(dead_after=3600.0))
    victim = cluster.daemon("kvstore-A")
    missed = _keys_with_primary(cluster, victim.name, 60, "m")  # written while the victim is down
    behind = _keys_with_primary(cluster, victim.name, 10, "b")  # counters it holds at 0, then misses increments
    _write_acknowledged(run, [(key, "0") for key in behind])
    victim.kill()
    _until(run, f"{victim.name} marked down", lambda: _state_everywhere(cluster, victim.name, "down"))
    _write_acknowledged(run, [(key, f"v-{key}" if i < 40 else "0") for i, key in enumerate(missed)])
    sessions = [run.session(f"w{i}", i) for i in range(3)]
    for i, key in enumerate(behind):
        for _ in range(3):
            sessions[i % 3].run("incr", key, "1")
    victim.start()
    victim.wait_healthy(60.0)
    _until(run, f"{victim.name} marked up again", lambda: _state_everywhere(cluster, victim.name, "up"))
    deletes, adds, counters = missed[:20], missed[20:40], missed[40:]
    for i, key in enumerate(deletes):
        sessions[i % 3].run("delete", key)
    for i, key in enumerate(adds):
        sessions[i % 3].run("add", key, f"added-{i}")
    for i, key in enumerate([*counters, *behind]):
        sessions[i % 3].run("incr", key, "1")
    for session in sessions:
        session.close()
    run.heal_time = run.recorder.now()
    return run.finish()


def removed_kvstore_restart(run: Run, watch_cut: float = 30.0, peer_cut: float = 10.0) -> Report:
    """Scenario 2: a removed kvstore restarts while its ring watch sees only the ring without it.

    Its ring watch polls a gateway cut from the other gateways for ``watch_cut`` seconds, so it hands
    everything off for the ring without itself; its own connections to one peer are cut for the first
    ``peer_cut`` seconds (the peers still reach it), so that handoff is still under way when the peers push
    its arcs back to it for the ring its registration (through another gateway) made.
    """
    cluster = run.start_cluster(kvstores=3, gateway_args=run.gateway_args(dead_after=5.0))
    leader = poll_until("a Raft leader", cluster.leader, 30.0)
    assert isinstance(leader, Daemon)
    # The kvstores A-C poll gateway-1 first; the returning one polls a follower that is not gateway-1.
    polled = next(g for g in cluster.gateways if g is not leader and g.name != "gateway-1")
    rest = [g for g in cluster.gateways if g is not polled]
    victim = cluster.add_kvstore("kvstore-D", wait=False, gateways=[polled.url, *(g.url for g in rest)])
    victim.wait_healthy(60.0)
    _until(run, "the cluster settled with kvstore-D", lambda: cluster.unsettled() is None)
    _write_acknowledged(run, [(f"k{i}", f"v{i}") for i in range(1000)])
    _until(run, "the cluster settled after the writes", lambda: cluster.unsettled() is None)
    victim.kill()
    _until(run, f"{victim.name} removed", lambda: _state_everywhere(cluster, victim.name, None))
    _until(run, "the peers handed its arcs off", lambda: cluster.unsettled() is None, 180.0)
    peer = cluster.daemon("kvstore-A")
    run.firewall.isolate(cluster.member(polled), [cluster.member(g) for g in rest])
    run.firewall.block(cluster.member(victim), cluster.member(peer))
    run.log(
        f"{run.recorder.now():7.1f}s cut {polled.name} from the other gateways, {victim.name}'s pushes to {peer.name}"
    )
    victim.start()
    victim.wait_healthy(60.0)
    run.log(f"{run.recorder.now():7.1f}s restarted {victim.name}")
    run.stop.wait(peer_cut)
    run.firewall.unblock(cluster.member(victim), cluster.member(peer))
    run.log(f"{run.recorder.now():7.1f}s reconnected {victim.name} and {peer.name}")
    run.stop.wait(max(0.0, watch_cut - peer_cut))
    run.firewall.heal()
    run.heal_time = run.recorder.now()
    run.log(f"{run.heal_time:7.1f}s reconnected {polled.name}")
    return run.finish()


def _cut_gateway_refuses_changes(run: Run, cluster: FaultCluster, gateway: Daemon) -> list[Violation]:
    """``leadership`` findings for ``gateway``, cut from the other gateways: once it says its map is not
    current it must name no leader on ``/ring/status``, and refuse a membership change (a drain, as
    ``chash nodes drain`` sends it, of a node that does not exist) with a 503 saying it knows or heard from
    no Raft leader and applied nothing, not the timeout of a command it forwarded over the cut link.
    Checked by what it answers, never by how fast (the time is logged)."""

    def stale() -> dict[str, Any] | None:
        status = cluster.gateway_status(gateway)
        return status if status is not None and status.get("map_current") is False else None

    status = poll_until(f"{gateway.name} to say its map is not current", stale, 30.0)
    found = []
    if status.get("leader") is not None:
        found.append(
            Violation("leadership", gateway.name, f"{gateway.name}, cut off, names leader {status['leader']!r}")
        )
    client = KVStoreClient(gateway.url, timeout=15.0, token=cluster.token)
    started = time.monotonic()
    try:
        client.drain("kvstore-none")
        answer = "a success"
    except ChashError as e:
        answer = f"{e.status} {e.detail}"
    finally:
        client.close()
    run.log(f"{run.recorder.now():7.1f}s drain at {gateway.name}: {answer} ({time.monotonic() - started:.2f}s)")
    if not (answer.startswith("503 ") and "no Raft leader" in answer and "nothing was applied" in answer):
        found.append(Violation("leadership", gateway.name, f"{gateway.name}, cut off, answered a drain with {answer}"))
    return found


def split_primary(run: Run, rounds: int = 30) -> Report:
    """Two gateways that disagree on a node's state pick different primaries for its keys.

    A kvstore is killed until marked down; one gateway is cut from the other two (it keeps the map in
    which the node is down, and still reaches every kvstore); the node comes back and is marked up on the
    other two. Then each counter whose primary it is gets pairs of increments at the same moment, one
    through a gateway that sees the node up (it is the primary there) and one through the cut gateway
    (the next replica is). Checked: no two acknowledged increments answer the same number, none is lost.
    """
    run.args.report = "under-replicated"
    cluster = run.start_cluster(kvstores=4, gateway_args=run.gateway_args(dead_after=3600.0))
    leader = poll_until("a Raft leader", cluster.leader, 30.0)
    assert isinstance(leader, Daemon)
    stale = next(g for g in reversed(cluster.gateways) if g is not leader)
    fresh = next(g for g in cluster.gateways if g is not stale)
    victim = cluster.daemon("kvstore-A")
    counters = _keys_with_primary(cluster, victim.name, 10, "split")
    _write_acknowledged(run, [(key, "0") for key in counters])
    victim.kill()
    _until(run, f"{victim.name} marked down", lambda: _state_everywhere(cluster, victim.name, "down"))
    run.firewall.isolate(cluster.member(stale), [cluster.member(g) for g in cluster.gateways if g is not stale])
    run.log(f"{run.recorder.now():7.1f}s cut {stale.name} from the other gateways")
    victim.start()
    victim.wait_healthy(60.0)

    def up_on_fresh() -> bool:
        return (cluster.ring_nodes(fresh) or {}).get(victim.name) == "up"

    _until(run, f"{victim.name} marked up on {fresh.name}", up_on_fresh)
    if (cluster.ring_nodes(stale) or {}).get(victim.name) != "down":
        raise RuntimeError(f"{stale.name} does not see {victim.name} down any more")
    refusals = _cut_gateway_refuses_changes(run, cluster, stale)
    endpoints = {e.name: i for i, e in enumerate(run.endpoints())}
    sessions = [run.session("w0", endpoints[fresh.name]), run.session("w1", endpoints[stale.name])]
    barrier = threading.Barrier(2, timeout=30.0)

    def increment(session: Session) -> None:
        for _ in range(rounds):
            for key in counters:
                barrier.wait()
                session.run("incr", key, "1")

    threads = [threading.Thread(target=increment, args=(s,), daemon=True) for s in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(rounds * len(counters) * 20.0)
    for session in sessions:
        session.close()
    run.firewall.heal()
    run.heal_time = run.recorder.now()
    run.log(f"{run.heal_time:7.1f}s reconnected {stale.name}")
    return run.finish(refusals)


SCENARIOS: dict[str, Callable[[Run], Report]] = {
    "rmw-stale-primary": rmw_at_stale_primary,
    "removed-restart": removed_kvstore_restart,
    "split-primary": split_primary,
}
