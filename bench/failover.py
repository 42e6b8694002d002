"""Leader failover benchmark: ``kill -9`` of the Raft leader to the first accepted membership change.

    python bench/failover.py [--trials 5] [--workdir DIR]

Starts three real gateways on loopback (Raft encrypted with a password, journals on disk), lets them
run, then for each trial kills the current leader with SIGKILL and POSTs a registration to the two
survivors in turn (1 s client timeout, 20 ms between attempts) until one is accepted. The killed gateway
is restarted and caught up before the next trial. Prints each trial and the median, against the target
(median at most 3 s). Every process is stopped by its pid at the end, also on failure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from chashd.launcher import ClusterSecrets, Daemon, clean_environ, free_ports, http_json

HOST = "127.0.0.1"
TARGET_MEDIAN = 3.0


class Cluster:
    """Three gateways as twistd processes."""

    def __init__(self, workdir: Path, count: int = 3) -> None:
        self.workdir = workdir
        ports = free_ports(3 * count)
        self.http, self.raft, self.line = ports[0::3], ports[1::3], ports[2::3]
        self.peers = ",".join(f"{HOST}:{p}" for p in self.raft)
        self.secrets = ClusterSecrets.generate()
        self.daemons = [self._daemon(i) for i in range(count)]

    def _daemon(self, i: int) -> Daemon:
        name = f"g{i + 1}"
        args = [
            "--gateway-id", name,
            "--port", f"tcp:{self.http[i]}:interface={HOST}",
            "--line-port", f"tcp:{self.line[i]}:interface={HOST}",
            "--raft-port", str(self.raft[i]),
            "--peers", self.peers,
            "--data-dir", str(self.workdir / name),
        ]  # fmt: skip
        env = clean_environ()
        env["CHASHD_RAFT_PASSWORD"] = self.secrets.raft_password
        return Daemon("chash-gateway", name, args, self.http[i], self.workdir / f"{name}.log", env=env)

    def start(self, i: int) -> None:
        self.daemons[i] = self._daemon(i)
        self.daemons[i].start().wait_healthy(60)

    def status(self, i: int) -> dict[str, Any]:
        return dict(http_json(self.daemons[i].url + "/ring/status", timeout=2)[1])

    def wait_agreed(self, timeout: float = 60) -> tuple[str, int]:
        """Wait until every running gateway names the same leader and epoch; returns them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                statuses = [self.status(i) for i, d in enumerate(self.daemons) if d.running()]
            except (OSError, ValueError):
                statuses = []
            views = {(s["leader"], s["epoch"]) for s in statuses}
            if len(views) == 1 and statuses and statuses[0]["leader"] is not None:
                leader, epoch = views.pop()
                return str(leader), int(epoch)
            time.sleep(0.1)
        raise SystemExit("the gateways did not agree on a leader in time; see the logs in " + str(self.workdir))

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop(timeout=15)


def register(url: str, node_id: str, seq: int) -> int:
    """POST one registration; the HTTP status, 0 when the gateway did not answer in time."""
    body = {"id": node_id, "host": HOST, "port": 9000, "line_port": 9001, "weight": 100, "seq": seq}
    try:
        code, _ = http_json(url + "/ring/nodes", timeout=1.0, method="POST", body=body)
    except OSError:
        return 0
    return code


def trial(cluster: Cluster, number: int) -> float:
    """Kill the leader, time the first accepted change, bring the killed gateway back."""
    leader, _ = cluster.wait_agreed()
    victim = int(leader[1:]) - 1
    survivors = [cluster.daemons[i].url for i in range(len(cluster.daemons)) if i != victim]
    time.sleep(1.0)  # a running cluster, not one that just elected
    cluster.daemons[victim].kill()
    start = time.monotonic()
    attempt = 0
    while True:
        code = register(survivors[attempt % len(survivors)], "bench-node", number + 1)
        attempt += 1
        if code in (200, 201):
            break
        if time.monotonic() - start > 60:
            raise SystemExit(f"trial {number}: no change accepted within 60 s")
        time.sleep(0.02)
    elapsed = time.monotonic() - start
    cluster.start(victim)
    cluster.wait_agreed()
    print(f"trial {number}: leader {leader} killed; first change accepted after {elapsed:.2f} s ({attempt} attempts)")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chashd-failover-"))
    cluster = Cluster(workdir)
    try:
        for i in range(len(cluster.daemons)):
            cluster.daemons[i].start()
        for daemon in cluster.daemons:
            daemon.wait_healthy(60)
        cluster.wait_agreed()
        times = [trial(cluster, n + 1) for n in range(args.trials)]
    finally:
        cluster.stop()
    median = statistics.median(times)
    verdict = "ok" if median <= TARGET_MEDIAN else "OVER TARGET"
    print(
        f"failover: median {median:.2f} s, min {min(times):.2f} s, max {max(times):.2f} s over {len(times)} trials "
        f"(target: median <= {TARGET_MEDIAN:.0f} s: {verdict})"
    )
    return 0 if median <= TARGET_MEDIAN else 1


if __name__ == "__main__":
    sys.exit(main())
