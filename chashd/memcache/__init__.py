"""The memcached text protocol, shared by both roles.

- ``chashd.memcache.text`` (pure: no Twisted, no clock): the parser and serializer, server and client side.
- ``chashd.memcache.server``: ``MemcacheServerFactory`` and ``MemcacheServerProtocol``, the line-protocol
  server of both roles over an ``IKeyValue`` backend. The wire grammar opens that module.
- ``chashd.memcache.client``: ``KVClientProtocol`` and ``KVClientPool``, the pipelined client of a kvstore
  (the gateway's and the handoff's), with its errors ``KVConnectionLost`` and ``KVTimeout``.

The names below are imported from their module on first use, so that importing the pure parser never
imports Twisted.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chashd.memcache.client import KVClientPool, KVClientProtocol, KVConnectionLost, KVTimeout
    from chashd.memcache.server import SERVER_VERSION, MemcacheServerFactory, MemcacheServerProtocol

__all__ = [
    "KVClientPool",
    "KVClientProtocol",
    "KVConnectionLost",
    "KVTimeout",
    "MemcacheServerFactory",
    "MemcacheServerProtocol",
    "SERVER_VERSION",
]

_HOMES = {
    "KVClientPool": "chashd.memcache.client",
    "KVClientProtocol": "chashd.memcache.client",
    "KVConnectionLost": "chashd.memcache.client",
    "KVTimeout": "chashd.memcache.client",
    "MemcacheServerFactory": "chashd.memcache.server",
    "MemcacheServerProtocol": "chashd.memcache.server",
    "SERVER_VERSION": "chashd.memcache.server",
}


def __getattr__(name: str) -> Any:
    """Import an exported name from its module when it is first asked for."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value
    return value
