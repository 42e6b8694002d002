"""Rounds of an in-process measurement, alternating with the same rounds run against other code.

The benchmarks that measure one part of chashd in process (bench/bulk_apply.py, bench/bulk_page.py,
bench/drops.py) take ``--baseline DIR``, a ``git archive`` of other code: each of their rounds is followed by a
round of the same script run with ``DIR`` first on ``PYTHONPATH`` (from ``DIR``, in a subprocess that prints the
round's figures as one JSON object), so that both codes see the machine in the same state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def alternate(
    rounds: int, measure: Callable[[], dict[str, float]], baseline: Path | None, script: str, one_round: list[str]
) -> dict[str, list[dict[str, float]]]:
    """``rounds`` rounds of ``measure()`` (``"this code"``), each followed, given ``baseline``, by a round of
    ``script`` (the benchmark's file) with ``one_round`` (its arguments for one round) against the baseline's code
    (``"baseline"``): the baseline's own copy of the script where it has one (it measures that code as it knew
    it), else this one."""
    runs: dict[str, list[dict[str, float]]] = {"this code": []}
    command: list[str] = []
    env = dict(os.environ)
    if baseline is not None:
        runs["baseline"] = []
        own = baseline / "bench" / Path(script).name
        command = [sys.executable, str(own if own.exists() else script), *one_round]
        env["PYTHONPATH"] = os.pathsep.join([str(baseline), env.get("PYTHONPATH", "")])
    for _ in range(rounds):
        runs["this code"].append(measure())
        if baseline is not None:
            out = subprocess.run(command, env=env, cwd=baseline, check=True, capture_output=True, text=True)
            runs["baseline"].append(json.loads(out.stdout))
    return runs
