"""twemproxy (nutcracker) for the gateway benchmark: find or install it, and write its configuration.

    ensure_nutcracker()   the binary's path; installs Debian's ``nutcracker`` with apt-get when it is
                          missing and we are root, else None with a message on stderr saying why
    write_config(...)     one pool, ketama distribution with md5 (libmemcached's ketama, the ring
                          chashd publishes), over the given memcached ports
    command(...)          the command line that runs it in the foreground

bench/gateway.py runs it over three ``memcached -t 1``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["command", "ensure_nutcracker", "write_config"]

_POLICY = Path("/usr/sbin/policy-rc.d")


def _find() -> str | None:
    return shutil.which("nutcracker") or next(
        (p for p in ("/usr/sbin/nutcracker", "/usr/bin/nutcracker") if os.access(p, os.X_OK)), None
    )


def ensure_nutcracker() -> str | None:
    """The nutcracker binary; installed with apt-get if missing (as root). None, with a message, if not."""
    found = _find()
    if found is not None:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        sys.stderr.write(
            "twemproxy is not installed and cannot be installed here (needs root and apt-get): "
            "run `apt-get install -y nutcracker` as root; skipping twemproxy\n"
        )
        return None
    print("installing twemproxy (Debian package nutcracker) with apt-get ...", flush=True)
    made_policy = False
    if not _POLICY.exists():  # keep apt from starting a nutcracker service of its own
        _POLICY.write_text("#!/bin/sh\nexit 101\n")
        _POLICY.chmod(0o755)
        made_policy = True
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = Path(tempfile.gettempdir()) / "chashd-bench-apt.log"
    try:
        with open(log, "wb") as out:
            install = ["apt-get", "install", "-y", "--no-install-recommends", "nutcracker"]
            if subprocess.run(install, stdout=out, stderr=subprocess.STDOUT, env=env).returncode != 0:
                subprocess.run(["apt-get", "update"], stdout=out, stderr=subprocess.STDOUT, env=env)
                subprocess.run(install, stdout=out, stderr=subprocess.STDOUT, env=env)
    finally:
        if made_policy:
            _POLICY.unlink(missing_ok=True)
    found = _find()
    if found is None:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:])
        sys.stderr.write(f"apt-get could not install nutcracker (log: {log}):\n{tail}\nskipping twemproxy\n")
    return found


def write_config(path: Path, port: int, backends: list[int]) -> Path:
    """A nutcracker configuration: 127.0.0.1:``port`` over memcached at 127.0.0.1:``backends``, ketama."""
    servers = "\n".join(f"   - 127.0.0.1:{p}:1 m{i + 1}" for i, p in enumerate(backends))
    path.write_text(
        "bench:\n"
        f"  listen: 127.0.0.1:{port}\n"
        "  hash: md5\n"
        "  distribution: ketama\n"
        "  timeout: 4000\n"
        "  preconnect: true\n"
        "  auto_eject_hosts: false\n"
        "  server_connections: 1\n"
        "  servers:\n"
        f"{servers}\n"
    )
    return path


def command(binary: str, config: Path, stats_port: int, log: Path) -> list[str]:
    """nutcracker in the foreground with ``config``, its stats on 127.0.0.1:``stats_port``."""
    return [binary, "-c", str(config), "-s", str(stats_port), "-a", "127.0.0.1", "-o", str(log)]
