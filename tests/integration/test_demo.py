"""example_demo.py runs to the end (--fast) against the cluster it starts, and stops what it started, also on
Ctrl-C."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chashd.launcher import clean_environ

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[2] / "example_demo.py"


def left_running(workdir: Path) -> list[str]:
    """Command lines of processes that still name ``workdir`` (the gateways' --data-dir)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(workdir) in text and "pytest" not in text:
            found.append(text)
    return found


def refused(output: str) -> list[str]:
    """The demo's printed HTTP endpoints that still accept connections."""
    open_ports = []
    for port in re.findall(r"http://127\.0\.0\.1:(\d+)", output):
        with socket.socket() as s:
            s.settimeout(2)
            if s.connect_ex(("127.0.0.1", int(port))) == 0:
                open_ports.append(port)
    return open_ports


def signal_state(pid: int) -> str:
    """The signal lines of ``pid``'s /proc status (blocked, ignored, caught), to tell why a signal was lost."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as e:
        return f"no status of {pid}: {e}"
    return " ".join(line for line in status.splitlines() if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


class DemoTests:
    """The demo a new user runs first."""

    def test_runs_to_the_end(self, tmp_path: Path) -> None:
        """Every screen shows, every check holds (no read error during drain and kill), exit 0, nothing left."""
        result = subprocess.run(
            [sys.executable, str(DEMO), "--fast", "--workdir", str(tmp_path)],
            capture_output=True,
            env=clean_environ(),
            timeout=400,
        )
        output = result.stdout.decode()
        assert result.returncode == 0, output + result.stderr.decode()
        for number in range(1, 7):
            assert f"=== {number}/6" in output
        assert "FAILED" not in output and "demo finished: every check held" in output
        assert re.search(r"\d+ reads during the drain and the kill, 0 errors", output)
        assert "stopping the cluster the demo started" in output
        assert left_running(tmp_path) == []
        assert refused(output) == []

    def test_ctrl_c_stops_everything(self, tmp_path: Path) -> None:
        """Ctrl-C (SIGINT) in the middle stops every process the demo started; exit 130."""
        process = subprocess.Popen(
            [sys.executable, str(DEMO), "--fast", "--workdir", str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=clean_environ(),
        )
        assert process.stdout is not None
        lines = []
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                line = process.stdout.readline().decode()
                lines.append(line)
                if not line or line.startswith("=== 2/6"):
                    break
            assert lines[-1].startswith("=== 2/6"), "".join(lines)
            signals = signal_state(process.pid)
            process.send_signal(signal.SIGINT)
            rest, _ = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        output = "".join(lines) + rest.decode()
        assert process.returncode == 130, f"{signals}\n{output}"
        assert "stopping the cluster the demo started" in output
        assert left_running(tmp_path) == []
        assert refused(output) == []
