"""What both HTTP clients share (standard library only): the API's calls, how answers are read, the
errors, ``Item`` and ``gateway_urls``. ``chashd.client`` exports the public names."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote, urlsplit

from chashd.errors import BadKey
from chashd.record import MAX_FLAGS, check_key
from chashd.ring import HashRing

__all__ = [
    "DEFAULT_GATEWAY",
    "ChashError",
    "Item",
    "NotFound",
    "Operations",
    "PreconditionFailed",
    "Rejected",
    "Response",
    "ServerError",
    "Unauthorized",
    "Unreachable",
    "error_for",
    "gateway_urls",
    "hash_ring",
]

T = TypeVar("T")

DEFAULT_GATEWAY = "http://127.0.0.1:8000"
#: The environment variable read when no gateway URL is given: comma-separated URLs.
GATEWAY_VARIABLE = "CHASH_GATEWAY"
TTL_HEADER = "X-Chash-TTL"
FLAGS_HEADER = "X-Chash-Flags"


# -- errors ------------------------------------------------------------------------------------------


class ChashError(Exception):
    """Any failure of a client operation. ``str(error)`` is one line for a person.

    ``status`` is the HTTP status (None when no server answered, or the client refused to send),
    ``detail`` the server's problem+json detail (or the client's own words), ``url`` the URL asked.
    """

    def __init__(self, detail: str, status: int | None = None, url: str | None = None, title: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.url = url
        self.title = title


class Rejected(ChashError):
    """The request was refused as it is (HTTP 4xx): repeating it unchanged will not help."""


class NotFound(Rejected):
    """HTTP 404: no such node or resource."""


class PreconditionFailed(Rejected):
    """HTTP 412: a conditional write (``cas=``, ``only_if_absent=True``) whose condition did not hold."""


class Unauthorized(Rejected):
    """HTTP 401 or 403: the operation needs the cluster's token (``token=``), or another one."""


class ServerError(ChashError):
    """The server failed (HTTP 5xx on every gateway tried) or answered something the API does not define."""


class Unreachable(ChashError):
    """No gateway could be reached; ``errors`` maps each URL tried to what went wrong."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        self.errors = dict(errors)
        tried = "; ".join(f"{url}: {why}" for url, why in self.errors.items())
        super().__init__(f"no gateway could be reached ({tried})")


def describe(error: object) -> str:
    """One line for a log: the HTTP status, when a server answered, and what went wrong."""
    status = getattr(error, "status", None)
    return f"HTTP {status}: {error}" if isinstance(status, int) else str(error)


_BY_STATUS: dict[int, type[Rejected]] = {
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    412: PreconditionFailed,
}


# -- values ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """A stored value with its metadata: ``cas`` is the version (the ETag), usable with ``put(cas=...)``;
    ``expires_at`` is a Unix time, 0 for never."""

    key: str
    value: bytes
    flags: int = 0
    cas: int = 0
    expires_at: int = 0


def gateway_urls(gateways: str | Iterable[str] | None = None, environ: Mapping[str, str] | None = None) -> list[str]:
    """Normalised base URLs: from ``gateways`` (a URL, a comma-separated list or an iterable of them), else
    from ``$CHASH_GATEWAY`` (comma-separated), else ``http://127.0.0.1:8000``.

    ``host:port`` becomes ``http://host:port``; a trailing ``/`` is dropped. Raises ``ValueError`` on an
    item that is not an http(s) URL.
    """
    if gateways is None:
        environ = os.environ if environ is None else environ
        gateways = environ.get(GATEWAY_VARIABLE) or DEFAULT_GATEWAY
    items = [gateways] if isinstance(gateways, str) else list(gateways)
    urls: list[str] = []
    for item in items:
        for part in item.split(","):
            text = part.strip()
            if not text:
                continue
            if "://" not in text:
                text = "http://" + text
            parts = urlsplit(text)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{part.strip()!r} is not a gateway URL such as http://127.0.0.1:8000")
            try:
                parts.port  # noqa: B018 - raises ValueError on a port out of range
            except ValueError:
                raise ValueError(f"{part.strip()!r} has a bad port number") from None
            url = text.rstrip("/")
            if url not in urls:
                urls.append(url)
    if not urls:
        raise ValueError("no gateway URL given")
    return urls


def _key_path(key: str | bytes) -> str:
    """``/kv/<key>`` with the key checked (memcached's rule) and percent-encoded."""
    raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    try:
        check_key(raw)
        text = raw.decode("utf-8")
    except BadKey as e:
        raise Rejected(f"bad key {key!r}: {e}") from None
    except UnicodeDecodeError:
        raise Rejected(f"bad key {key!r}: the HTTP API takes UTF-8 keys") from None
    return "/kv/" + quote(text, safe="")


# -- requests and how their answers are read (shared by both clients) --------------------------------


@dataclass(frozen=True)
class Response:
    """An HTTP answer: header names in lower case."""

    url: str
    status: int
    headers: Mapping[str, str]
    body: bytes


def error_for(response: Response) -> ChashError:
    """The ``ChashError`` for an answer that is not a success, with the problem+json detail if any."""
    detail, title = "", ""
    try:
        problem = json.loads(response.body) if response.body else None
    except ValueError:
        problem = None
    if isinstance(problem, dict):
        detail = str(problem.get("detail") or "")
        title = str(problem.get("title") or "")
    if not detail:
        text = response.body[:200].decode("utf-8", "replace").strip()
        detail = f"HTTP {response.status}" + (f": {text}" if text else "")
    kind: type[ChashError] = ServerError
    if 400 <= response.status < 500:
        kind = _BY_STATUS.get(response.status, Rejected)
    return kind(detail, status=response.status, url=response.url, title=title)


def _json(response: Response) -> Any:
    if response.status >= 300:
        raise error_for(response)
    try:
        return json.loads(response.body)
    except ValueError:
        raise ServerError(
            f"the answer of {response.url} is not JSON", status=response.status, url=response.url
        ) from None


def _json_object(response: Response) -> dict[str, Any]:
    body = _json(response)
    if not isinstance(body, dict):
        raise ServerError(f"the answer of {response.url} is not a JSON object", status=response.status)
    return body


def _nothing(response: Response) -> None:
    if response.status >= 300:
        raise error_for(response)


def _header_int(response: Response, name: str) -> int:
    text = response.headers.get(name.lower(), "0").strip().removeprefix("W/").strip('"')
    return int(text) if text.isdigit() else 0


def _item(key: str) -> Callable[[Response], Item | None]:
    def parse(response: Response) -> Item | None:
        if response.status == 404:
            return None
        if response.status != 200:
            raise error_for(response)
        return Item(
            key=key,
            value=response.body,
            flags=_header_int(response, FLAGS_HEADER),
            cas=_header_int(response, "ETag"),
            expires_at=_header_int(response, "X-Chash-Expires-At"),
        )

    return parse


def _deleted(response: Response) -> bool:
    if response.status == 404:
        return False
    if response.status >= 300:
        raise error_for(response)
    return True


@dataclass(frozen=True)
class Call(Generic[T]):
    """One operation: the request to send to a server and how to read its answer (``parse`` raises the
    ``ChashError`` of an answer that is not a success)."""

    method: str
    path: str
    parse: Callable[[Response], T]
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Seconds the server may take on purpose (a long poll), added to the client's timeout.
    extra_time: float = 0.0


class Operations:
    """The calls of the API, built once for both clients; ``token`` goes on every call that needs it."""

    def __init__(self, token: str | None) -> None:
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}

    def put(
        self,
        key: str | bytes,
        value: bytes | str,
        ttl: int | None,
        flags: int,
        cas: int | None,
        only_if_absent: bool,
    ) -> Call[None]:
        data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        if not 0 <= flags <= MAX_FLAGS:
            raise Rejected(f"flags {flags} is not an unsigned 32-bit integer")
        headers = {"Content-Type": "application/octet-stream", **self._auth}  # a kvstore's writes need it
        if ttl:
            headers[TTL_HEADER] = str(int(ttl))
        if flags:
            headers[FLAGS_HEADER] = str(flags)
        if cas is not None:
            headers["If-Match"] = f'"{int(cas)}"'
        elif only_if_absent:
            headers["If-None-Match"] = "*"
        return Call("PUT", _key_path(key), _nothing, data, headers)

    def get(self, key: str | bytes) -> Call[Item | None]:
        shown = key if isinstance(key, str) else key.decode("utf-8", "replace")
        return Call("GET", _key_path(key), _item(shown))

    def delete(self, key: str | bytes) -> Call[bool]:
        return Call("DELETE", _key_path(key), _deleted, None, self._auth)

    def lookup(self, key: str | bytes) -> Call[dict[str, Any]]:
        return Call("GET", "/ring/lookup/" + _key_path(key).removeprefix("/kv/"), _json_object)

    def ring(self, after: int | None, wait: float | None) -> Call[dict[str, Any]]:
        if after is None:
            return Call("GET", "/ring", _json_object)
        wait = 30.0 if wait is None else wait
        return Call("GET", f"/ring?after={int(after)}&timeout={wait:g}", _json_object, extra_time=wait)

    def placement(self, known: str | None, wait: float | None) -> Call[dict[str, Any]]:
        if known is None:
            return Call("GET", "/ring/placement", _json_object, None, self._auth)
        wait = 30.0 if wait is None else wait
        path = f"/ring/placement?known={quote(known, safe='')}&timeout={wait:g}"
        return Call("GET", path, _json_object, None, self._auth, extra_time=wait)

    def status(self) -> Call[dict[str, Any]]:
        return Call("GET", "/ring/status", _json_object)

    def nodes(self) -> Call[list[dict[str, Any]]]:
        def parse(response: Response) -> list[dict[str, Any]]:
            nodes = _json_object(response).get("nodes")
            if not isinstance(nodes, list):
                raise ServerError(f"the answer of {response.url} has no node list", status=response.status)
            return nodes

        return Call("GET", "/ring/nodes", parse)

    def node(self, node_id: str) -> Call[dict[str, Any]]:
        def parse(response: Response) -> dict[str, Any]:
            node = _json_object(response).get("node")
            if not isinstance(node, dict):
                raise ServerError(f"the answer of {response.url} has no node", status=response.status)
            return node

        return Call("GET", "/ring/nodes/" + quote(node_id, safe=""), parse)

    def drain(self, node_id: str) -> Call[dict[str, Any]]:
        return Call("POST", f"/ring/nodes/{quote(node_id, safe='')}/drain", _json_object, b"", self._auth)

    def remove(self, node_id: str) -> Call[dict[str, Any]]:
        return Call("DELETE", "/ring/nodes/" + quote(node_id, safe=""), _json_object, None, self._auth)

    def health(self) -> Call[dict[str, Any]]:
        return Call("GET", "/health", _json_object)

    def register(self, announcement: Mapping[str, Any]) -> Call[dict[str, Any]]:
        body = json.dumps(dict(announcement)).encode()
        return Call("POST", "/ring/nodes", _json_object, body, {"Content-Type": "application/json", **self._auth})


def hash_ring(ring: dict[str, Any]) -> HashRing:
    """The ``HashRing`` of a ``GET /ring`` answer; ``ServerError`` when it does not make one."""
    try:
        return HashRing.from_dict(ring)
    except ValueError as e:
        raise ServerError(f"the gateway's ring cannot be rebuilt: {e}") from None
