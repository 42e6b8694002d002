"""Fault injection with real processes: a short seeded schedule of the faults today's code survives, and
the known ways to lose or corrupt data (tests/faults/scenarios.py) as regression scenarios.

Each test runs ``python -m tests.faults.runner`` in a private network and PID namespace (tests/faults:
3 gateways and 4-5 SQLite kvstores, each on its own 127.0.0.x, links cut with iptables in that namespace
only). They skip, saying why, where the machine cannot do that (not root, no unshare, no iptables).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.faults.history import FAIL, OK, read_history
from tests.faults.netns import SKIP_STATUS, preflight, run_in_namespace
from tests.faults.runner import ROOT

pytestmark = pytest.mark.slow

#: What the CI schedule runs: every fault but ``remove`` (not run here to keep the suite's time: scenario 2 is
#: its regression test), writers that set, add, delete and increment 10 counters (since gateways without
#: leader contact refuse read-modify-writes and kvstores fence them by map epoch, two gateways whose maps
#: differ no longer apply increments at two primaries). Anti-entropy runs a pass every ``CI_ANTI_ENTROPY``
#: seconds, and every key must be on its N replicas within ``CI_CONVERGENCE`` seconds of the heal (the stated
#: bound: one interval plus one pass, a few seconds with this run's 2,000-odd keys; measured 5.9-8.6 s, and 6.3 s
#: on 2026-12-03 at load 4.5-8).
CI_FAULTS = ("kill-leader", "partition-gateway", "kill", "pause", "partition-kvstore", "join", "drain")
CI_MIX = "set=35,fresh=15,add=10,delete=10,incr=10,get=20"
CI_ANTI_ENTROPY = 5
CI_CONVERGENCE = 30


class FaultViolations(AssertionError):
    """The checker found violations (the message is its summary)."""


def run_faults(tmp_path: Path, *args: str, timeout: float = 600.0) -> dict[str, Any]:
    """Run the runner with ``args``; its ``result.json``. Skips when the machine cannot run it; fails
    (not with ``FaultViolations``) when the run itself broke."""
    reason = preflight()
    if reason is not None:
        pytest.skip(reason)
    workdir = tmp_path / "run"
    result = run_in_namespace([*args, "--workdir", str(workdir), "--timeout", str(timeout)], ROOT, timeout)
    if result.returncode == SKIP_STATUS:
        pytest.skip(result.stdout.strip().splitlines()[-1])
    path = workdir / "result.json"
    if result.returncode not in (0, 1) or not path.exists():
        pytest.fail(f"the fault-injection run failed (status {result.returncode}):\n{result.stdout[-6000:]}")
    body: dict[str, Any] = json.loads(path.read_text())
    body["output"] = result.stdout
    return body


def assert_no_violations(result: dict[str, Any]) -> None:
    """Raise ``FaultViolations`` with the run's summary when the checker found anything."""
    if not result["ok"]:
        raise FaultViolations(
            f"violations {result['categories']} (history and logs in the run's directory):\n{result['output'][-6000:]}"
        )


def test_short_schedule(tmp_path: Path) -> None:
    """A seeded schedule (seed 201: each fault of ``CI_FAULTS`` once, 1-3 s of calm after each) with
    writers and readers through every gateway: every step is injected and healed, most operations are
    acknowledged, and the checker finds no lost write, undone delete, stale read, contradicting
    ``add``/``delete``/``incr`` answer, lost increment or phantom, and every key is back on its N replicas
    within ``CI_CONVERGENCE`` seconds of the heal (anti-entropy, without reads)."""
    result = run_faults(
        tmp_path,
        "--seed", "201",
        "--length", "50",
        "--rest", "1,3",
        "--faults", ",".join(CI_FAULTS),
        "--mix", CI_MIX,
        "--counters", "10",
        f"--kvstore-arg=--anti-entropy-interval={CI_ANTI_ENTROPY}",
        "--convergence", str(CI_CONVERGENCE),
    )  # fmt: skip
    assert {e["fault"] for e in result["events"]} == set(CI_FAULTS)
    assert len(result["events"]) == len(result["schedule"])
    counts = result["counts"]
    acknowledged = sum(c.get("ok", 0) for c in counts.values())
    assert acknowledged > 2000, counts
    assert all(counts[kind]["ok"] for kind in ("set", "add", "delete", "incr", "get")), counts
    assert result["replicas_checked"] > 200
    assert_no_violations(result)
    # The stated convergence bound, measured (the checker's under-replicated finding enforces it too).
    healed = result["heal_to_replication"]
    print(f"{result['replicas_checked']} keys on N replicas {healed}s after the last heal (bound {CI_CONVERGENCE}s)")
    assert healed is not None and healed <= CI_CONVERGENCE, healed


def test_rmw_at_stale_primary(tmp_path: Path) -> None:
    """Failed until the router read the key from the replicas before a read-modify-write:
    a kvstore killed until marked down misses writes of keys whose primary it is; once it is up again,
    ``delete``, ``add`` and ``incr`` of those keys answer as a single memcached would for the acknowledged
    history (DELETED, NOT_STORED, the next number), and the counters keep every acknowledged increment."""
    result = run_faults(tmp_path, "--scenario", "rmw-stale-primary", timeout=300.0)
    assert sum(c.get("ok", 0) for c in result["counts"].values()) >= 170, result["counts"]
    assert_no_violations(result)


def test_removed_kvstore_restart(tmp_path: Path) -> None:
    """Failed until a kvstore stopped its handoff on a push for a ring newer than it knows (``xepoch``): a
    kvstore removed by --dead-after restarts while the gateway its ring watch polls is cut from the others
    (~30 s) and its own connections to one peer are cut for the first 10 s (so its handoff for the ring
    without itself is still under way when its peers push its arcs back for the ring that has it again); once
    the cluster settles, every key is on N replicas (it dropped none of what its peers pushed)."""
    # Anti-entropy off: it would repair what the handoff lost; this checks the handoff alone.
    result = run_faults(
        tmp_path, "--scenario", "removed-restart", "--kvstore-arg=--anti-entropy-interval=0", timeout=400.0
    )
    assert result["counts"]["set"]["ok"] >= 1000, result["counts"]
    assert result["replicas_checked"] == 1000
    assert_no_violations(result)


def test_split_primary(tmp_path: Path) -> None:
    """Failed until a gateway that heard from no Raft leader within the election timeout refused
    read-modify-writes: a gateway cut from the other two still sees a returning kvstore down while they see
    it up; of the pairs of increments of the node's counters sent at the same moment through both, the cut
    gateway's are refused with nothing applied (SERVER_ERROR naming the Raft leader; or, before that gateway
    counts its leader lost, the kvstores' epoch fence: a newer map known there), the other's acknowledged,
    no two acknowledged increments answer the same number and none is lost. The cut gateway, once its map is
    not current, names no leader and refuses a drain at once with a 503 (a ``leadership`` finding otherwise)."""
    result = run_faults(tmp_path, "--scenario", "split-primary", timeout=300.0)
    increments = [op for op in read_history(tmp_path / "run" / "history.jsonl") if op.kind == "incr"]
    fresh = [op for op in increments if op.client == "w0"]
    stale = [op for op in increments if op.client == "w1"]
    assert len(fresh) == len(stale) == 300, result["counts"]
    assert sum(op.outcome == OK for op in fresh) >= 250, result["counts"]
    reasons = ("Raft leader", "the read-modify-write was not applied")
    refused = [op for op in stale if op.outcome == FAIL and any(reason in op.error for reason in reasons)]
    assert len(refused) == len(stale), [op for op in stale if op not in refused][:3]
    assert_no_violations(result)
