# -*- test-case-name: tests.unit.test_memcache_server,tests.unit.test_memcache_client -*-
"""What the line protocol's server and client connections both do to their transport."""

from __future__ import annotations

from contextlib import suppress
from typing import Any

__all__ = ["set_nodelay"]


def set_nodelay(transport: Any) -> None:
    """Send small writes at once: with Nagle's algorithm and the peer's delayed ACKs a reply or a request
    could wait up to 40 ms. A transport without the option (a UNIX socket) is left alone."""
    set_option = getattr(transport, "setTcpNoDelay", None)
    if set_option is not None:
        with suppress(OSError):  # a UNIX socket has no Nagle
            set_option(True)
