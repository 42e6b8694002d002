"""``GET``/``HEAD /kv/<key>`` answered without Klein's routing (``chashd.web._http._KeyReads``): the same bytes
as the Klein route gives, over a kvstore's backend (answers at once) and a gateway's router (answers later)."""

from __future__ import annotations

import gc
import re
from typing import Any, cast

import pytest
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from chashd.kvstore.backend import LocalBackend
from chashd.metrics import RequestMetrics
from chashd.storage import MemoryEngine
from chashd.web import KeyValueHTTP
from chashd.web._http import _KeyReads
from tests.unit.test_router import NOW, Cluster

#: Requests whose answers must be the same on both paths (each on a connection of its own). The keys
#: stored first: ``k`` (flags 7), ``ttl`` (expires), ``café``, ``a:b``, ``a/b``.
REQUESTS = [
    b"GET /kv/k HTTP/1.1",
    b"HEAD /kv/k HTTP/1.1",
    b"GET /kv/ttl HTTP/1.1",
    b"GET /kv/missing HTTP/1.1",
    b"HEAD /kv/missing HTTP/1.1",
    b"GET /kv/caf%C3%A9 HTTP/1.1",  # percent-decoded, UTF-8
    b"GET /kv/a%3Ab HTTP/1.1",
    b"GET /kv/a%2Fb HTTP/1.1",  # a slash in the key, in one segment
    b"GET /kv/a/b HTTP/1.1",  # the same key in two segments: left to Klein
    b"GET /kv/k?x=1 HTTP/1.1",  # the query is not part of the key
    b"GET /kv/a%20b HTTP/1.1",  # a bad key: 400
    b"GET /kv/" + b"x" * 251 + b" HTTP/1.1",  # too long: 400
    b"GET /kv/ HTTP/1.1",  # empty: 400
    b"GET /kv/k HTTP/1.0",  # no chunked encoding, the connection closes
    b"GET /kv/%2Fa HTTP/1.1",  # a leading slash
    b"GET /kv//a HTTP/1.1",  # the same key
    b"GET /kv/.. HTTP/1.1",  # a dot segment is a key like any other
    b"GET /kv/a// HTTP/1.1",  # slashes are never merged
]
#: The requests of ``REQUESTS`` that the fast path answers (the others go to Klein there too). A path that is
#: not UTF-8 is answered by neither (``test_http_keys``).
FAST = {0, 1, 2, 3, 4, 5, 6, 7, 9, 13, 14, 16}


class _Counting(Resource):
    """The Klein resource, counting the requests it renders."""

    isLeaf = True

    def __init__(self, app: IResource) -> None:
        super().__init__()
        self.app = app
        self.rendered = 0

    def render(self, request: IRequest) -> Any:
        self.rendered += 1
        return self.app.render(request)


def _kvstore(clock: Any, requests: RequestMetrics | None = None) -> KeyValueHTTP:
    return KeyValueHTTP(LocalBackend(MemoryEngine(), "kv-1", clock, 1 << 20), role="kvstore", requests=requests)


def _exchange(site: Any, *raw: bytes) -> tuple[bytes, Any, StringTransport]:
    """Send ``raw`` requests on one new connection to ``site``: what came back (the Date header blanked),
    the channel and its transport."""
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    for request in raw:
        channel.dataReceived(request)
    return _no_date(transport.value()), channel, transport


def _no_date(answer: bytes) -> bytes:
    return re.sub(rb"\r\nDate: [^\r]*\r\n", b"\r\nDate: -\r\n", answer)


def _request(line: bytes, headers: bytes = b"") -> bytes:
    return line + b"\r\nHost: gw\r\n" + headers + b"\r\n"


def _fill(site: Any) -> None:
    for path, headers in (
        (b"/kv/k", b"X-Chash-Flags: 7\r\n"),
        (b"/kv/ttl", b"X-Chash-TTL: 100\r\n"),
        (b"/kv/caf%C3%A9", b""),
        (b"/kv/a:b", b""),
        (b"/kv/a%2Fb", b""),
        (b"/kv/%2Fa", b""),
        (b"/kv/..", b""),
        (b"/kv/a%2F%2F", b""),
    ):
        body = b"value of " + path
        put = b"PUT %s HTTP/1.1\r\nHost: gw\r\n%sContent-Length: %d\r\n\r\n%s" % (path, headers, len(body), body)
        answer, _, _ = _exchange(site, put)
        assert answer.startswith(b"HTTP/1.1 204 "), answer


def _surfaces(kind: str) -> tuple[KeyValueHTTP, Any, Cluster | None]:
    if kind == "kvstore":
        cluster = None
        clock: Any = Cluster(count=1, replicas=1, w=1, r=1).clock  # any Clock at NOW
        http = _kvstore(clock, RequestMetrics())
    else:
        n = {"gateway-n1": 1, "gateway-n3": 3}[kind]
        cluster = Cluster(count=3, replicas=n, w=min(n, 2), r=min(n, 2))
        clock = cluster.clock
        http = KeyValueHTTP(cluster.router, role="gateway", requests=RequestMetrics())
    return http, clock, cluster


@pytest.mark.parametrize("kind", ["kvstore", "gateway-n1", "gateway-n3"])
def test_answers_are_klein_s(kind: str) -> None:
    """Every request of ``REQUESTS`` gets the same bytes (status line, headers in order, body, framing) from
    the fast path as from the Klein route alone; the fast path answers the plain GETs and HEADs of a valid
    key itself, and hands everything else to Klein."""
    http, clock, _ = _surfaces(kind)
    klein = _Counting(http.app.resource())
    fast = http.site(_KeyReads(http, klein), reactor=clock)
    general = http.site(http.app.resource(), reactor=clock)
    _fill(general)
    for index, line in enumerate(REQUESTS):
        before = klein.rendered
        got, _, _ = _exchange(fast, _request(line))
        expected, _, _ = _exchange(general, _request(line))
        assert got == expected, line
        assert (klein.rendered == before) == (index in FAST), line
    hit, _, _ = _exchange(fast, _request(b"GET /kv/k HTTP/1.1"))
    assert hit.startswith(b"HTTP/1.1 200 OK\r\n") and hit.endswith(b"\r\n\r\nvalue of /kv/k")
    for header in (b"Content-Type: application/octet-stream", b"X-Chash-Flags: 7", b"Content-Length: 14"):
        assert b"\r\n" + header + b"\r\n" in hit
    assert re.search(rb'\r\nETag: "\d+"\r\n', hit)
    ttl, _, _ = _exchange(fast, _request(b"GET /kv/ttl HTTP/1.1"))
    assert b"\r\nX-Chash-Expires-At: %d\r\n" % (NOW + 100) in ttl
    head, _, _ = _exchange(fast, _request(b"HEAD /kv/k HTTP/1.1"))
    assert b"\r\nContent-Length: 14\r\n" in head and head.endswith(b"\r\n\r\n")
    miss, _, _ = _exchange(fast, _request(b"GET /kv/missing HTTP/1.1"))
    assert miss.startswith(b"HTTP/1.1 404 Not Found\r\n") and b"application/problem+json" in miss
    assert b"no value for key 'missing'" in miss
    accented, _, _ = _exchange(fast, _request(b"GET /kv/caf%C3%A9 HTTP/1.1"))
    assert accented.endswith(b"value of /kv/caf%C3%A9")
    slash, _, _ = _exchange(fast, _request(b"GET /kv/a/b HTTP/1.1"))
    assert slash.endswith(b"value of /kv/a%2Fb")
    for line, stored in ((b"GET /kv//a HTTP/1.1", b"/kv/%2Fa"), (b"GET /kv/a// HTTP/1.1", b"/kv/a%2F%2F")):
        answer, _, _ = _exchange(fast, _request(line))
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"value of " + stored), line


@pytest.mark.parametrize("kind", ["kvstore", "gateway-n1", "gateway-n3"])
def test_metrics_are_counted_alike(kind: str) -> None:
    """The fast path times each read in the ``http``/``get`` histogram and counts its error answers (a bad key;
    a miss is an answer, not an error), as the Klein route does."""
    counts = []
    for fast in (True, False):
        http, clock, _ = _surfaces(kind)
        site = http.site(None if fast else http.app.resource(), reactor=clock)
        _fill(site)
        for line in (b"GET /kv/k HTTP/1.1", b"HEAD /kv/missing HTTP/1.1", b"GET /kv/a%20b HTTP/1.1"):
            _exchange(site, _request(line))
        requests = http._requests
        assert requests is not None
        histogram = requests.histogram("http", "get")
        counts.append((sum(histogram.counts), requests.errors("http", "client"), requests.errors("http", "server")))
    assert counts[0] == counts[1] == (2, 1, 0)


def test_quorum_failure_is_klein_s() -> None:
    """A read whose replicas are down is the same 503 problem (Retry-After, counted as a server error) on
    both paths."""
    answers = []
    for fast in (True, False):
        http, clock, cluster = _surfaces("gateway-n1")
        assert cluster is not None
        site = http.site(None if fast else http.app.resource(), reactor=clock)
        _fill(site)
        cluster.links[cluster.replicas(b"k")[0]].mode = "down"
        answer, _, _ = _exchange(site, _request(b"GET /kv/k HTTP/1.1"))
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and b"\r\nRetry-After: 1\r\n" in answer
        assert http._requests is not None and http._requests.errors("http", "server") == 1
        answers.append(answer)
    assert answers[0] == answers[1]


def _waiting(raw: bytes) -> tuple[KeyValueHTTP, Any, Any, StringTransport]:
    """``raw`` sent to a gateway N=1 whose kvstore holding ``k`` holds its requests: the surface, that
    kvstore's link, the channel and its transport."""
    http, site, link = _hanging()
    answer, channel, transport = _exchange(site, raw)
    assert answer == b""
    return http, link, channel, transport


def _hanging() -> tuple[KeyValueHTTP, Any, Any]:
    """A gateway N=1, filled, whose kvstore holding ``k`` holds its requests: the surface, its site and that
    kvstore's link."""
    http, clock, cluster = _surfaces("gateway-n1")
    assert cluster is not None
    site = http.site(reactor=clock)
    _fill(site)
    link = cluster.links[cluster.replicas(b"k")[0]]
    link.mode = "hang"
    return http, site, link


def test_pipelined_reads_answer_in_order() -> None:
    """Two reads sent together, the first waiting for its kvstore: nothing is written until it is answered,
    then both answers leave in request order."""
    _, link, _, transport = _waiting(_request(b"GET /kv/k HTTP/1.1") + _request(b"GET /kv/missing HTTP/1.1"))
    link.resume()
    answer = _no_date(transport.value())
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.index(b"value of /kv/k") < answer.index(b" 404 ")


def test_client_gone_before_the_answer() -> None:
    """A client that disconnects while its read waits for the kvstore gets nothing written, and the late
    answer is dropped without an error (as Klein does)."""
    http, link, channel, transport = _waiting(_request(b"GET /kv/k HTTP/1.1"))
    channel.connectionLost(Failure(ConnectionLost("gone")))
    with capturedLogs() as events:
        link.resume()
        gc.collect()  # an unhandled failure in a Deferred is logged when it is collected
    assert [e for e in events if "log_failure" in e] == []
    assert transport.value() == b""
    assert http._requests is not None and sum(http._requests.histogram("http", "get").counts) == 1


def _dummy_read(http: KeyValueHTTP) -> DummyRequest:
    """A ``GET /kv/k`` rendered by the fast path as a ``DummyRequest``: an ``IRequest`` without twisted.web's
    private ``_disconnected`` flag (as a twisted.web that renamed it would give), so the fast path learns
    of a lost connection through ``notifyFinish``."""
    request = DummyRequest([b"kv", b"k"])
    assert not hasattr(request, "_disconnected")
    klein = _Counting(http.app.resource())
    assert _KeyReads(http, klein).render(cast(IRequest, request)) is NOT_DONE_YET
    assert klein.rendered == 0
    return request


def test_a_request_without_the_private_flag_is_answered() -> None:
    """A request without ``_disconnected`` whose client stays gets its answer written and finished once the
    kvstore answers, as a twisted.web request does."""
    http, _, link = _hanging()
    request = _dummy_read(http)
    assert request.written == [] and request.finished == 0
    link.resume()
    assert b"".join(request.written) == b"value of /kv/k" and request.finished == 1
    assert request.responseHeaders.getRawHeaders(b"Content-Length") == [b"14"]


def test_a_request_without_the_private_flag_whose_client_went() -> None:
    """A request without ``_disconnected`` whose connection is lost while its read waits (``notifyFinish``
    fails): nothing is written, it is not finished, and the late answer is dropped without an error."""
    http, _, link = _hanging()
    request = _dummy_read(http)
    request.processingFailed(Failure(ConnectionLost("gone")))  # how a DummyRequest's connection is lost
    with capturedLogs() as events:
        link.resume()
        gc.collect()  # an unhandled failure in a Deferred is logged when it is collected
    assert [e for e in events if "log_failure" in e] == []
    assert request.written == [] and request.finished == 0


def test_twisted_web_requests_take_no_finish_notice() -> None:
    """twisted.web's own requests carry ``_disconnected``: the fast path reads it and asks for no
    ``notifyFinish`` Deferred (which would cost one a request)."""
    _, _, channel, _ = _waiting(_request(b"GET /kv/k HTTP/1.1"))
    (waiting,) = channel.requests
    assert type(waiting._disconnected) is bool
    assert waiting.notifications == []
