"""Python clients of a chashd cluster's HTTP API: one blocking, one for Twisted code.

    from chashd.client import KVStoreClient, NotFound

    client = KVStoreClient(["http://10.0.0.5:8000", "http://10.0.0.6:8000"], timeout=5)
    client.put("user:42", b"{...}", ttl=3600, flags=1)
    client.get("user:42")            # b"{...}", or None when the key has no value
    client.lookup("user:42")         # the preference list: {"nodes": [{"id": "kvstore-A", ...}, ...], ...}

``KVStoreClient`` uses only the standard library (``http.client``): a persistent connection per gateway and
per thread, so one client may be shared by threads; importing it imports no Twisted. ``AsyncKVStoreClient``
(imported from ``chashd.client._twisted`` when first asked for, like ``http_client``, the treq client the
daemons make) does the same on treq and returns Deferreds.
Both take one or several gateway URLs (``host:port`` is read as ``http://host:port``) and
try them in turn when one cannot be reached or answers 503 (no quorum, no leader, shutting down: the
gateway says the request is safe to repeat); the gateway that last answered is tried first next time.
A kvstore's URL works as well for the key-value operations (it serves the same ``/kv`` API).

The modules: ``_api`` (the calls, how answers are read, the errors: standard library only), ``_blocking``
(``KVStoreClient``), ``_twisted`` (``AsyncKVStoreClient`` and ``http_client``, the treq client the daemons
make their requests with).

Every failure raises (or fails the Deferred with) a ``ChashError``, carrying the server's problem+json
``detail`` when there is one:

    ChashError
      Rejected             the server refused the request (HTTP 4xx), or the client did before sending it
        NotFound           404: no such node, no such route (a missing key is ``None``/``False`` instead)
        PreconditionFailed 412: ``cas=`` that is not the stored version, ``only_if_absent`` over a value
        Unauthorized       401/403: node admin, or a write to a kvstore directly, wants the cluster's token
                           (``token=``: sent as ``Authorization: Bearer <token>``)
      ServerError          5xx after every gateway was tried, or an answer that is not what the API says
      Unreachable          no gateway could be reached (connection refused, reset, timed out)

``describe(error)`` is the one line a log gives such an error: its HTTP status, when a server answered, and
the detail.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from chashd.client._api import (
    DEFAULT_GATEWAY,
    ChashError,
    Item,
    NotFound,
    PreconditionFailed,
    Rejected,
    ServerError,
    Unauthorized,
    Unreachable,
    describe,
    gateway_urls,
)
from chashd.client._blocking import KVStoreClient

if TYPE_CHECKING:
    from chashd.client._twisted import AsyncKVStoreClient, http_client

__all__ = [
    "DEFAULT_GATEWAY",
    "AsyncKVStoreClient",
    "ChashError",
    "Item",
    "KVStoreClient",
    "NotFound",
    "PreconditionFailed",
    "Rejected",
    "ServerError",
    "Unauthorized",
    "Unreachable",
    "describe",
    "gateway_urls",
    "http_client",
]


if not TYPE_CHECKING:  # for a type checker, the import above says what the name is

    def __getattr__(name: str) -> Any:
        """``AsyncKVStoreClient`` and ``http_client`` are imported (with Twisted and treq) when first asked for."""
        if name not in ("AsyncKVStoreClient", "http_client"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from chashd.client import _twisted

        value = getattr(_twisted, name)
        globals()[name] = value
        return value
