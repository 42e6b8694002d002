"""The outbound HTTP client both roles use (treq over a quiet, persistent connection pool)."""

from __future__ import annotations

from typing import Any

from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory

__all__ = ["http_client"]


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False


def http_client(reactor: Any, connect_timeout: float = 5.0) -> HTTPClient:
    """A treq client whose pool keeps connections open and logs no line per connection."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _QuietClientFactory  # type: ignore[misc]
    pool.maxPersistentPerHost = 4
    return HTTPClient(Agent(reactor, connectTimeout=connect_timeout, pool=pool))
