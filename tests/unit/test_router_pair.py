"""The router's common quorum read (``_PairRead``: ``forward_get`` with R=2, nothing suspect or moving) against
its general read (``_KeyRead``): the same replies, requests, read repairs, counters and suspects, scenario by
scenario, the replicas answering, disagreeing, failing, hanging and not knowing ``xver``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionLost

from chashd.commands import Store, XGet, XPut, XVer
from chashd.errors import UnknownCommand
from chashd.gateway import router as router_module
from chashd.record import Record
from chashd.versions import Version
from tests.unit.test_memcache_client import Sink
from tests.unit.test_router import NOW, Cluster

KEY = b"k1"
BASE = int(NOW * 1000) << 16
OLD = Record(b"old", 3, 0, Version(BASE, "w"))
NEW = Record(b"new", 4, 0, Version(BASE + 1, "w"))
GONE = Record(b"", 0, 0, Version(BASE + 2, "w"), tombstone=True)
EXPIRED = Record(b"exp", 0, int(NOW) - 1, Version(BASE + 2, "w"))


def _hold(records: tuple[Record | None, Record | None, Record | None]) -> Callable[[Cluster], None]:
    """Each replica of ``KEY``, in preference order, holds the record given (None: nothing)."""

    def setup(c: Cluster) -> None:
        for node, record in zip(c.replicas(KEY), records):
            if record is not None:
                c.links[node].backend.execute(XPut(KEY, record))

    return setup


def _refusing(index: int, kind: type, error: Callable[[], Exception]) -> Callable[[Cluster], None]:
    """Replica ``index`` fails every request of ``kind`` with ``error()`` (and answers the others)."""

    def setup(c: Cluster) -> None:
        link = c.links[c.replicas(KEY)[index]]
        run = link._run

        def refusing(command: Any) -> Deferred[Any]:
            return fail(error()) if type(command) is kind else run(command)

        link._run = refusing  # type: ignore[method-assign]  # this kvstore refuses one kind of request

    return setup


def _without_xver(index: int) -> Callable[[Cluster], None]:
    """Replica ``index`` is a kvstore of an earlier version: ``xver`` is an unknown command there."""
    return _refusing(index, XVer, UnknownCommand)


def _failing_gets(index: int) -> Callable[[Cluster], None]:
    """Replica ``index`` loses the connection on every ``xget`` (its ``xver`` is answered)."""
    return _refusing(index, XGet, lambda: ConnectionLost("gone"))


def _mode(index: int, mode: str) -> Callable[[Cluster], None]:
    """Replica ``index`` is ``down`` (its connection declines, or fails a request) or ``hang``s."""

    def setup(c: Cluster) -> None:
        c.links[c.replicas(KEY)[index]].mode = mode

    return setup


def _then(*steps: Callable[[Cluster], None]) -> Callable[[Cluster], None]:
    def run(c: Cluster) -> None:
        for step in steps:
            step(c)

    return run


def _advance(seconds: float) -> Callable[[Cluster], None]:
    return lambda c: c.advance(seconds)


def _resume(index: int) -> Callable[[Cluster], None]:
    return lambda c: c.links[c.replicas(KEY)[index]].resume()


def _lose_held(c: Cluster) -> None:
    """Every request a hanging replica holds fails: its connection is lost."""
    for link in c.links.values():
        for held in link.held:
            held.errback(ConnectionLost("lost"))


SAME = _hold((NEW, NEW, NEW))
#: name: (what the replicas hold and do before the read, what happens after it is sent)
SCENARIOS: dict[str, tuple[Callable[[Cluster], None], Callable[[Cluster], None]]] = {
    "agree": (SAME, _advance(0)),
    "first newer": (_hold((NEW, OLD, OLD)), _advance(0)),
    "second newer": (_hold((OLD, NEW, OLD)), _advance(0)),
    "third newer": (_hold((OLD, OLD, NEW)), _advance(0)),
    "only on first": (_hold((NEW, None, None)), _advance(0)),
    "only on second": (_hold((None, NEW, None)), _advance(0)),
    "nowhere": (_hold((None, None, None)), _advance(0)),
    "deleted on first": (_hold((GONE, NEW, NEW)), _advance(0)),
    "deleted on second": (_hold((NEW, GONE, NEW)), _advance(0)),
    "expired": (_hold((EXPIRED, OLD, OLD)), _advance(0)),
    "second without xver": (_then(_hold((NEW, OLD, OLD)), _without_xver(1)), _advance(0)),
    "second without xver, newer": (_then(_hold((OLD, NEW, OLD)), _without_xver(1)), _advance(0)),
    "first declines": (_then(SAME, _mode(0, "down")), _advance(0)),
    "second declines": (_then(SAME, _mode(1, "down")), _advance(0)),
    "first fails": (_then(_hold((NEW, OLD, NEW)), _failing_gets(0)), _advance(0)),
    "second newer, fails its record": (_then(_hold((OLD, NEW, OLD)), _failing_gets(1)), _advance(0)),
    "two fail": (_then(SAME, _failing_gets(0), _mode(2, "down")), _advance(0)),
    "first hangs": (_then(SAME, _mode(0, "hang")), _then(_advance(0.05), _advance(0), _resume(0))),
    "second hangs": (_then(_hold((NEW, OLD, OLD)), _mode(1, "hang")), _then(_advance(0.05), _resume(1))),
    "both hang": (
        _then(SAME, _mode(0, "hang"), _mode(1, "hang")),
        _then(_advance(0.05), _advance(0.05), _resume(1), _resume(0)),
    ),
    "first hangs, answers in time": (_then(_hold((NEW, OLD, OLD)), _mode(0, "hang")), _resume(0)),
    "second hangs, answers in time": (_then(_hold((OLD, NEW, OLD)), _mode(1, "hang")), _resume(1)),
    "all hang, then fail": (
        _then(SAME, _mode(0, "hang"), _mode(1, "hang"), _mode(2, "hang")),
        _then(
            _advance(0.05),
            _advance(0.05),
            _lose_held,
        ),
    ),
}


#: Scenarios read twice: the second read by what the first learnt (a kvstore without ``xver`` is asked with ``xget``).
READ_TWICE = {"second without xver", "second without xver, newer"}


def _run(name: str, pair: bool, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """``SCENARIOS[name]`` with the pair read (or the general read alone), and all it left."""
    before, after = SCENARIOS[name]
    c = Cluster()
    before(c)
    taken: list[bool] = []
    pair_read = router_module.Router._pair_read

    def spied(self: router_module.Router, key: bytes, replicas: tuple[str, ...], sink: Any) -> bool:
        took = pair and pair_read(self, key, replicas, sink)
        taken.append(took)
        return took

    monkeypatch.setattr(router_module.Router, "_pair_read", spied)
    sink = Sink()
    assert c.router.forward_get(KEY, sink)
    after(c)
    if name in READ_TWICE:
        assert c.router.forward_get(KEY, sink)
    c.advance(10)  # every timer that may still run
    stats = c.router.stats()
    return {
        "replies": sink.replies,
        "errors": [f"{type(e).__name__}: {e}" for e in sink.errors],
        "sent": {n: link.sent for n, link in c.links.items()},
        "records": {n: c.record(n, KEY) for n in c.links},
        "counters": {k: v for k, v in stats.items()},
        "taken": taken,
        "timers": len(c.clock.getDelayedCalls()),
    }


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_pair_read_is_the_general_read(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pair read gives the client the same reply (or error), sends every replica the same requests, leaves
    the same records (read repair), counters and suspects as the general read, in every scenario."""
    general = _run(name, False, monkeypatch)
    monkeypatch.undo()
    paired = _run(name, True, monkeypatch)
    reads = 2 if name in READ_TWICE else 1
    assert general["taken"] == [False] * reads
    assert paired["taken"] == [name != "first declines"] + [False] * (reads - 1)
    for part in ("replies", "errors", "sent", "records", "counters", "timers"):
        assert paired[part] == general[part], part
    assert len(general["replies"]) + len(general["errors"]) == reads


def test_pair_read_answers_and_repairs() -> None:
    """The common read: one ``xget`` to the first replica, one ``xver`` to the second, the first's record to the
    client, and a second replica behind it given the record."""
    c = Cluster()
    _hold((NEW, OLD, OLD))(c)
    first, second, third = c.replicas(KEY)
    sink = Sink()
    assert c.router.forward_get(KEY, sink)
    assert sink.replies == [b"VALUE k1 4 3\r\nnew\r\nEND\r\n"]
    assert c.links[first].sent == [XGet((KEY,))]
    assert c.links[second].sent == [XVer(KEY), XPut(KEY, NEW)]
    assert c.links[third].sent == []
    assert c.record(second, KEY) == NEW and c.record(third, KEY) == OLD
    assert c.router.stats()["read_repairs"] == 1 and c.router.stats()["get_hits"] == 1


def test_pair_read_is_not_taken_with_a_suspect_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a node suspect (slow) the general read runs, which asks suspects last."""
    c = Cluster()
    assert c.router.execute(Store("set", KEY, 0, 0, b"v")).called
    c.router._mark_slow(c.replicas(KEY)[0])
    asked: list[bytes] = []
    pair_read = router_module.Router._pair_read

    def spied(self: router_module.Router, key: bytes, replicas: tuple[str, ...], sink: Any) -> bool:
        asked.append(key)
        return pair_read(self, key, replicas, sink)

    monkeypatch.setattr(router_module.Router, "_pair_read", spied)
    sink = Sink()
    assert c.router.forward_get(KEY, sink)
    assert asked == [] and sink.replies == [b"VALUE k1 0 1\r\nv\r\nEND\r\n"]
