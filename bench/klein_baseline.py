"""The HTTP baseline of bench/kvstore_http.py: a bare Klein route over a dict, served by twisted.web.

python bench/klein_baseline.py PORT
"""

from __future__ import annotations

import sys
from typing import Any

from klein import Klein
from twisted.web.server import Site

app = Klein()
values: dict[str, bytes] = {}


@app.route("/kv/<path:key>", methods=["GET"])
def get(request: Any, key: str) -> bytes:
    """The value, or 404."""
    value = values.get(key)
    if value is None:
        request.setResponseCode(404)
        return b"not found"
    return value


@app.route("/kv/<path:key>", methods=["PUT"])
def put(request: Any, key: str) -> bytes:
    """Store the body."""
    values[key] = request.content.read()
    request.setResponseCode(204)
    return b""


class QuietSite(Site):
    """No access log, as the kvstore's site."""

    def log(self, request: Any) -> None:
        pass


def main() -> None:
    from twisted.internet import reactor

    reactor.listenTCP(int(sys.argv[1]), QuietSite(app.resource()), interface="127.0.0.1")  # type: ignore[arg-type]  # Twisted types Site as no ServerFactory[...] listenTCP takes
    reactor.run()


if __name__ == "__main__":
    main()
