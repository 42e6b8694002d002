"""An acknowledged write survives kill -9: a real child process writes, we kill it, reopen the file.

The child opens a ``SQLiteEngine`` and writes in a loop: single puts, applies, and batches of applies,
overwriting keys with ever higher versions. It prints ``key version`` on stdout after each call (or
batch) returns, which is the moment a kvstore would acknowledge the write. The test reads those lines
from the pipe, sends SIGKILL at a random moment, reads what was printed before the kill, reopens the
file in this process and checks that every key holds its last acknowledged version or a later one
(written but not yet acknowledged when the kill came), with the value of that version.
"""

from __future__ import annotations

import os
import random
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chashd.record import Record
from chashd.storage import SQLiteEngine
from chashd.versions import Version

pytestmark = pytest.mark.slow

WRITER = r"""
import sys
from chashd.record import Record
from chashd.storage import SQLiteEngine
from chashd.versions import Version

path, start, keys = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
engine = SQLiteEngine(path)
out = sys.stdout


def record(clock):
    return Record(b"value of %d " % clock * 8, clock % 7, 0, Version(clock, "child"))


clock = start
while True:
    clock += 1
    key = b"key-%d" % (clock % keys)
    if clock % 97 == 0:
        acked = []
        with engine.batch():
            for _ in range(20):
                clock += 1
                key = b"key-%d" % (clock % keys)
                engine.apply(key, record(clock))
                acked.append((key, clock))
        out.write("".join("%s %d\n" % (k.decode(), c) for k, c in acked))
    else:
        if clock % 2:
            engine.put(key, record(clock))
        else:
            engine.apply(key, record(clock))
        out.write("%s %d\n" % (key.decode(), clock))
    out.flush()
"""


def expected_record(clock: int) -> Record:
    """The record the child writes at ``clock`` (same formula as in WRITER)."""
    return Record(b"value of %d " % clock * 8, clock % 7, 0, Version(clock, "child"))


def run_and_kill(path: Path, start: int, keys: int, rng: random.Random) -> tuple[dict[bytes, int], int]:
    """Run a writer child, SIGKILL it after a random number of acknowledgements.

    Returns the last acknowledged version of each key and the highest clock acknowledged.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(start), str(keys)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    acked: dict[bytes, int] = {}
    highest = start
    buffer = b""
    kill_after = rng.randint(50, 6000)
    seen = 0
    deadline = time.monotonic() + 120
    try:
        assert child.stdout is not None
        fd = child.stdout.fileno()
        os.set_blocking(fd, False)
        selector = selectors.DefaultSelector()
        selector.register(fd, selectors.EVENT_READ)
        killed = False
        while True:
            if time.monotonic() > deadline:
                raise AssertionError(f"the writer gave {seen} acknowledgements in 120 s")
            if not killed and seen >= kill_after:
                # Leave a random sliver of time for writes that will not be acknowledged.
                time.sleep(rng.random() * 0.01)
                child.send_signal(signal.SIGKILL)
                killed = True
            if not selector.select(timeout=1.0):
                if child.poll() is not None and not killed:
                    raise AssertionError(f"the writer died by itself: {child.stderr.read()!r}")  # type: ignore[union-attr]
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                key, clock = line.split()
                acked[key] = int(clock)
                highest = max(highest, int(clock))
                seen += 1
        selector.close()
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr.read()  # type: ignore[union-attr]
    assert seen >= kill_after
    return acked, highest


def check(path: Path, acked: dict[bytes, int]) -> None:
    """Every acknowledged key holds its acknowledged version or a later one, with that version's value."""
    engine = SQLiteEngine(path)
    try:
        for key, clock in acked.items():
            stored = engine.get(key)
            assert stored is not None, f"acknowledged {key!r} at {clock} is lost"
            assert stored.version.clock >= clock, f"{key!r}: acknowledged {clock}, found {stored.version}"
            assert stored == expected_record(stored.version.clock)
    finally:
        engine.close()


class DurabilityTests:
    """kill -9 loses no acknowledged write."""

    def test_kill_nine(self, tmp_path: Path) -> None:
        """Three writers are killed at random moments on one file; after each, every acknowledged write is there."""
        rng = random.Random()
        seed = rng.randrange(2**32)
        rng.seed(seed)
        path = tmp_path / "data" / "chashd.sqlite3"
        everything: dict[bytes, int] = {}
        start = 0
        for _ in range(3):
            acked, start = run_and_kill(path, start + 1000, 2000, rng)
            assert acked, f"seed {seed}: no acknowledgement before the kill"
            everything.update(acked)
            check(path, everything)
