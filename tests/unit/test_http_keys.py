"""Which key an HTTP path names on both roles' ``/kv/<key>`` (the fast path and the Klein routes), and that it
is the key the line protocol names: the path after ``/kv/`` percent-decoded once, taken as it is (``//``, a
leading or trailing ``/``, ``.`` and ``..`` segments kept), or a 400 problem+json naming the rule."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs

from chashd.client._api import _key_path
from chashd.commands import Get, Status, Store, Values
from chashd.web import KeyValueHTTP
from tests.unit.test_http_fast import _exchange, _request, _surfaces

#: A path after ``/kv/`` and the key (the line protocol's bytes) it names.
PATHS = [
    (b"plain", b"plain"),
    (b"a//b", b"a//b"),
    (b"a%2F%2Fb", b"a//b"),
    (b"a/", b"a/"),
    (b"a%2F", b"a/"),
    (b"%2Fa", b"/a"),
    (b"/a", b"/a"),
    (b"%2F", b"/"),
    (b"..", b".."),
    (b"%2E%2E", b".."),
    (b".", b"."),
    (b"a/../b", b"a/../b"),
    (b"a/./b", b"a/./b"),
    (b"a%252Fb", b"a%2Fb"),  # decoded once
    (b"a%25", b"a%"),
    (b"caf%C3%A9", "café".encode()),
    (b"a%3Fb%23c", b"a?b#c"),
    (b"a+b;c", b"a+b;c"),
]

#: A path after ``/kv/`` that names no key the HTTP API takes, and what its 400 says.
REFUSED = [
    (b"%FF", "not UTF-8 once percent-decoded"),
    (b"a/%C3", "not UTF-8 once percent-decoded"),
    (b"a%20b", "space or a control character"),
    (b"a%00b", "space or a control character"),
    (b"a%7F", "space or a control character"),
    (b"", "key is empty"),
    (b"x" * 251, "longer than 250 bytes"),
]

KINDS = ["kvstore", "gateway-n3"]


def _done(result: Any) -> Any:
    """The result of a backend call (the test backends answer at once, Deferred or not)."""
    if isinstance(result, Deferred):
        box: list[Any] = []
        result.addBoth(box.append)
        assert box, "the backend did not answer at once"
        return box[0]
    return result


def _value(http: KeyValueHTTP, key: bytes) -> bytes | None:
    """The key's value as the line protocol's ``get`` reads it from the role's backend."""
    result = _done(http._backend.execute(Get((key,))))  # type: ignore[union-attr]  # the test's surfaces have one
    assert isinstance(result, Values)
    return next((record.value for found, record in result.items if found == key), None)


def _ask(site: Any, method: bytes, path: bytes, body: bytes | None = None) -> tuple[int, bytes]:
    """One request; (status, body)."""
    headers = b"Content-Length: %d\r\n" % len(body) if body is not None else b""
    answer, _, _ = _exchange(site, _request(method + b" /kv/" + path + b" HTTP/1.1", headers) + (body or b""))
    head, _, content = answer.partition(b"\r\n\r\n")
    if b"Transfer-Encoding: chunked" in head:
        content = _unchunk(content)
    return int(head.split(b" ", 2)[1]), content


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, rest = data.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out += rest[:n]
        data = rest[n + 2 :]
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_path_names_the_line_protocol_key(kind: str) -> None:
    """A PUT stores the value under the key the table says (read back with the line protocol's ``get``), and
    a GET and a DELETE of the path reach that key; paths that name the same key reach the same record."""
    http, clock, _ = _surfaces(kind)
    site = http.site(reactor=clock)
    for path, key in PATHS:
        body = b"value for " + path
        assert _ask(site, b"PUT", path, body)[0] == 204, path
        assert _value(http, key) == body, path
        assert _ask(site, b"GET", path) == (200, body), path
        assert _ask(site, b"HEAD", path)[0] == 200, path
    for path, key in PATHS:
        _ask(site, b"DELETE", path)
        assert _value(http, key) is None, path


@pytest.mark.parametrize("kind", KINDS)
def test_line_protocol_keys_round_trip(kind: str) -> None:
    """A key the line protocol stored is read over HTTP at the path the chash client builds for it (every
    ``/`` and other reserved byte percent-encoded), and at the path as written: the same value."""
    http, clock, _ = _surfaces(kind)
    site = http.site(reactor=clock)
    for path, key in PATHS:
        value = b"line value of " + key
        assert _done(http._backend.execute(Store("set", key, 0, 0, value))) is Status.STORED  # type: ignore[union-attr]
        client_path = _key_path(key).removeprefix("/kv/").encode()
        assert _ask(site, b"GET", client_path) == (200, value), (key, client_path)
        assert _ask(site, b"GET", path) == (200, value), (key, path)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"PUT", b"DELETE"])
def test_refused_keys(kind: str, method: bytes) -> None:
    """A path that names no key the HTTP API takes is a 400 problem+json naming the rule, for every method,
    counted as a client error; nothing is stored."""
    http, clock, cluster = _surfaces(kind)
    site = http.site(reactor=clock)
    for path, rule in REFUSED:
        code, content = _ask(site, method, path, b"x" if method == b"PUT" else None)
        assert code == 400, (method, path)
        if method != b"HEAD":
            problem = json.loads(content)
            assert problem["status"] == 400 and rule in problem["detail"], (method, path, problem)
    requests = http._requests
    assert requests is not None and requests.errors("http", "client") == len(REFUSED)
    stores = [link.backend for link in cluster.links.values()] if cluster is not None else [http._backend]
    assert all(store.stats()["curr_items"] == 0 for store in stores)  # type: ignore[union-attr]


def test_not_utf8_names_the_rule_without_a_traceback() -> None:
    """A path that is not UTF-8 once decoded gets a problem+json 400 saying the HTTP API takes UTF-8 keys (Klein
    alone answers it in plain text and logs a traceback)."""
    http, clock, _ = _surfaces("kvstore")
    site = http.site(reactor=clock)
    with capturedLogs() as events:
        answer, _, _ = _exchange(site, _request(b"GET /kv/caf%E9 HTTP/1.1"))
    assert answer.startswith(b"HTTP/1.1 400 ") and b"application/problem+json" in answer
    assert b"is not UTF-8 once percent-decoded: on the HTTP API a key is 1 to 250 bytes of UTF-8" in answer
    assert not [e for e in events if e.get("log_failure") is not None]
