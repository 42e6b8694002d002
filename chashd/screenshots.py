# -*- test-case-name: tests.integration.test_status_page -*-
"""Headless Chromium pointed at a gateway's status page: its rendered DOM and its screenshot.

Used by the browser test (tests/integration/test_status_page.py) and to regenerate the README's pictures:

    .venv/bin/python -m chashd.screenshots docs/

starts a local cluster (3 gateways, 3 kvstores), writes some keys, reads some for 3 s, and writes
``docs/status-page.png`` (a screenshot of gateway-1's status page) and ``docs/ring.svg`` (``chash ring
--svg``). Chromium is Debian's
``chromium`` package (``./dev.sh test`` installs it when it can); it runs headless as root with
``--no-sandbox``, a new empty profile, and nothing that reaches beyond this machine. Blocking code for scripts
and tests, never imported by the daemons.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

__all__ = ["ChromiumError", "DomElements", "chromium", "dump_dom", "screenshot"]

#: The flags every run gets: headless, no sandbox (root), no GPU, and no network of its own (no QUIC, no
#: background requests, component updates or sync), so it only fetches the URL it is given.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


class ChromiumError(Exception):
    """Chromium is missing, failed or did not finish in time."""


def chromium() -> str | None:
    """The Chromium binary, or None when it is not installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(args: list[str], timeout: float) -> str:
    """Run Chromium with ``args`` and a new empty profile; its stdout. Its whole process group is killed
    when it overruns ``timeout``."""
    binary = chromium()
    if binary is None:
        raise ChromiumError("Chromium is not installed (Debian package: chromium)")
    with tempfile.TemporaryDirectory(prefix="chashd-chromium-") as profile:
        command = [binary, *FLAGS, f"--user-data-dir={profile}", *args]
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True
        )
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the group this call started: Chromium and its children
            process.communicate()
            raise ChromiumError(f"Chromium did not finish within {timeout:g}s: {' '.join(command)}") from None
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    if process.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-5:]
        raise ChromiumError(f"Chromium exited with {process.returncode}: {' / '.join(tail)}")
    return out.decode("utf-8", errors="replace")


def dump_dom(url: str, budget_ms: int = 5000, timeout: float = 90.0) -> str:
    """The page's DOM as HTML after its scripts ran for ``budget_ms`` of virtual time."""
    return _run([f"--virtual-time-budget={budget_ms}", "--dump-dom", url], timeout)


def screenshot(url: str, path: Path, size: tuple[int, int] = (1100, 1300), budget_ms: int = 3000) -> Path:
    """A PNG screenshot of ``url`` at ``size`` into ``path``."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(
        [f"--window-size={size[0]},{size[1]}", f"--virtual-time-budget={budget_ms}", f"--screenshot={path}", url],
        timeout=90.0,
    )
    if not path.exists() or path.stat().st_size == 0:
        raise ChromiumError(f"Chromium wrote no screenshot to {path}")
    return path


class DomElements(HTMLParser):
    """Every start tag of a dumped DOM with its attributes, in document order: ``elements``."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {name: value or "" for name, value in attrs}))

    def find(self, tag: str, **wanted: str) -> list[dict[str, str]]:
        """The attributes of every ``tag`` element that has the ``wanted`` attributes (``data_node`` is data-node)."""
        wanted = {name.replace("_", "-"): value for name, value in wanted.items()}
        return [
            attrs
            for name, attrs in self.elements
            if name == tag and all(attrs.get(key) == value for key, value in wanted.items())
        ]


def main(argv: list[str] | None = None) -> int:
    """Regenerate the README's pictures into a directory."""
    parser = argparse.ArgumentParser(prog="python -m chashd.screenshots", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="where status-page.png and ring.svg go (docs/)")
    args = parser.parse_args(argv)
    from chashd.cli import main as chash
    from chashd.client import KVStoreClient
    from chashd.launcher import LocalCluster

    if chromium() is None:
        print("Chromium is not installed: apt-get install chromium", file=sys.stderr)
        return 1
    args.directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chashd-screenshots-") as work, LocalCluster(Path(work)) as cluster:
        client = KVStoreClient(cluster.gateway_urls)
        for i in range(500):
            client.put(f"user:{i}", b"x" * 100)
        cluster.wait_for_nodes()
        page = cluster.gateway_urls[0] + "/status/main"
        urllib.request.urlopen(page, timeout=10).read()  # the first sample of the counters' rates
        started = time.monotonic()
        while time.monotonic() - started < 3:
            for i in range(20):
                client.get(f"user:{i}")
        screenshot(cluster.gateway_urls[0] + "/", args.directory / "status-page.png")
        status = chash(["--gateway", cluster.gateway_urls[0], "ring", "--svg", str(args.directory / "ring.svg")])
        if status:
            return status
    print(f"wrote {args.directory / 'status-page.png'} and {args.directory / 'ring.svg'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
