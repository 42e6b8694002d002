"""The Klein resource shared by the kvstore and the gateway.

Routes::

    GET /health    liveness: 200 while the process serves
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Site
from werkzeug.exceptions import HTTPException

__all__ = ["KeyValueHTTP", "json_response", "problem"]


class _QuietSite(Site):
    noisy = False

    def log(self, request: Any) -> None:
        pass


def json_response(request: IRequest, body: Any, code: int = 200) -> bytes:
    """Serialize ``body`` as the JSON answer of ``request``."""
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body, sort_keys=True).encode() + b"\n"


def problem(request: IRequest, code: int, title: str, detail: str, **extra: Any) -> bytes:
    """An RFC 9457 ``application/problem+json`` answer."""
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/problem+json")
    body = {"type": "about:blank", "title": title, "status": code, "detail": detail, **extra}
    return json.dumps(body, sort_keys=True).encode() + b"\n"


class KeyValueHTTP:
    """The key-value HTTP surface over a role's backend.

    ``health`` returns the JSON body of ``GET /health`` (the role, its id, what it knows).
    """

    app = Klein()
    _log = Logger()

    def __init__(self, health: Callable[[], dict[str, Any]]) -> None:
        self._health = health

    def resource(self) -> IResource:
        """The twisted.web resource to serve."""
        return self.app.resource()

    def site(self) -> Site:
        """A ``Site`` serving ``resource()`` with no access log (a line per request costs more than the request)."""
        return _QuietSite(self.resource())

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request: IRequest) -> bytes:
        """Liveness: the process is up and its reactor answers."""
        return json_response(request, {"status": "ok", **self._health()})

    @app.handle_errors(HTTPException)
    def _routing_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, HTTPException)
        code = error.code or 500
        if code == 405:
            allowed = ", ".join(sorted(getattr(error, "valid_methods", None) or []))
            request.setHeader(b"Allow", allowed.encode())
            detail = f"{request.method.decode()} is not allowed here; use {allowed}"
        elif code == 404:
            detail = f"no such resource: {request.path.decode(errors='replace')}"
        else:
            detail = error.description or error.name
        return problem(request, code, error.name, detail)

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        self._log.failure(
            "unexpected error answering {method} {path}", failure, method=request.method, path=request.path
        )
        return problem(request, 500, "Internal Server Error", "the server failed to handle the request")
