"""The memcached text protocol, shared by both roles.

- ``chashd.memcache.text`` (L0, pure): the parser and serializer, server and client side, with the wire
  grammar (memcached's commands and the versioned extension) in its docstring.
- ``chashd.memcache.protocol`` (L1): the Twisted server over an ``IKeyValue`` backend, and the pipelined
  client (and pool) the gateway uses to talk to kvstores.

Nothing is imported here, so that importing the pure parser never imports Twisted.
"""

__all__: list[str] = []
