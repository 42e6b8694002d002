#!/usr/bin/env python3
"""Container health check of a chashd daemon: exit 0 when ``GET /health`` answers 200, else 1.

The image serves both roles, so the port comes from the environment the daemon reads too:
``$CHASHD_HEALTH_PORT``, else the port of ``$LISTEN_PORT`` or ``$CHASHD_PORT`` (a port number or a
``tcp:PORT:...`` endpoint string), else the two roles' default HTTP ports, 8000 and 8080 (healthy if either
answers). Only the standard library: it runs in the image's Python, and on any host for a quick check.
"""

from __future__ import annotations

import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping

DEFAULT_PORTS = (8000, 8080)


def ports_to_probe(environ: Mapping[str, str]) -> tuple[int, ...]:
    """The HTTP ports to try, from the environment."""
    for name in ("CHASHD_HEALTH_PORT", "LISTEN_PORT", "CHASHD_PORT"):
        value = environ.get(name, "").strip()
        if not value:
            continue
        match = re.fullmatch(r"(?:tcp6?:)?(\d{1,5})(?::.*)?", value) or re.match(r"tcp6?:.*\bport=(\d{1,5})", value)
        if match:
            return (int(match.group(1)),)
    return DEFAULT_PORTS


def healthy(port: int, host: str = "127.0.0.1", timeout: float = 3.0) -> bool:
    """True when ``http://host:port/health`` answers 200."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=timeout) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError, ValueError):
        return False


def main(environ: Mapping[str, str] | None = None) -> int:
    """0 when one of the ports answers /health with 200, else 1 (with the reason on stderr)."""
    environ = os.environ if environ is None else environ
    ports = ports_to_probe(environ)
    host = environ.get("CHASHD_HEALTH_HOST", "127.0.0.1")
    if any(healthy(port, host) for port in ports):
        return 0
    sys.stderr.write(f"chashd-healthcheck: no 200 from /health on {host} port(s) {', '.join(map(str, ports))}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
