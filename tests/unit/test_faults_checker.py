"""The fault-injection checker on hand-made histories: each kind of anomaly is reported, and what the
design allows (concurrent writes, indeterminate and failed writes either way) is not."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

from tests.faults.checker import ReplicaState, check
from tests.faults.history import (
    FAIL,
    INFO,
    OK,
    Event,
    Op,
    Recorder,
    read_events,
    read_history,
    write_events,
    write_history,
)


class History:
    """Builds a history: ``h.op("set", "k", "v1", 1.0, 1.1)`` adds an acknowledged set from 1.0 s to 1.1 s."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self._index: Iterator[int] = itertools.count()

    def op(
        self,
        kind: str,
        key: str,
        value: str | None,
        invoke: float,
        complete: float,
        result: str | None = None,
        outcome: str = OK,
        client: str = "w1",
    ) -> Op:
        if result is None and outcome == OK:
            result = {"set": "STORED", "add": "STORED", "delete": "DELETED"}.get(kind)
        op = Op(next(self._index), client, "gateway-1", kind, key, value, invoke, complete, outcome, result)
        self.ops.append(op)
        return op

    def read(self, key: str, result: str | None, invoke: float, complete: float, client: str = "r1") -> Op:
        return self.op("get", key, None, invoke, complete, result=result, client=client)


def categories(h: History, **kw: object) -> list[str]:
    return [v.category for v in check(h.ops, **kw).violations]  # type: ignore[arg-type]


class RegisterTests:
    """Keys written with set/add/delete and read with get."""

    def test_clean_history(self) -> None:
        """Reads that see the newest acknowledged state, in the order the writes were acknowledged, pass."""
        h = History()
        h.op("set", "k", "v1", 1.0, 1.1)
        h.read("k", "v1", 1.2, 1.3)
        h.op("set", "k", "v2", 2.0, 2.1)
        h.read("k", "v2", 2.2, 2.3)
        h.op("delete", "k", None, 3.0, 3.1)
        h.read("k", None, 3.2, 3.3)
        h.op("add", "k", "v3", 4.0, 4.1)
        h.op("add", "k", "v4", 5.0, 5.1, result="NOT_STORED")
        h.op("delete", "k", None, 6.0, 6.1)
        h.op("delete", "k", None, 7.0, 7.1, result="NOT_FOUND")
        h.read("k", None, 8.0, 8.1, client="final")
        report = check(h.ops)
        assert report.ok, report.summary()
        assert report.counts["set"] == {OK: 2}

    def test_lost_write(self) -> None:
        """A final read that misses an acknowledged set is a lost write."""
        h = History()
        h.op("set", "k", "v1", 1.0, 1.1)
        h.read("k", None, 10.0, 10.1, client="final")
        [violation] = check(h.ops).violations
        assert violation.category == "lost-write"
        assert violation.key == "k"
        assert violation.ops == (1, 0)

    def test_lost_write_overwritten_by_older_value(self) -> None:
        """A final read that returns a value older than an acknowledged set is a lost write."""
        h = History()
        h.op("set", "k", "v1", 1.0, 1.1)
        h.op("set", "k", "v2", 2.0, 2.1)
        h.read("k", "v1", 10.0, 10.1, client="final")
        assert categories(h) == ["lost-write"]

    def test_undone_delete(self) -> None:
        """A final read that returns a value an acknowledged delete removed is an undone delete."""
        h = History()
        h.op("set", "k", "v1", 1.0, 1.1)
        h.op("delete", "k", None, 2.0, 2.1)
        h.read("k", "v1", 10.0, 10.1, client="final")
        assert categories(h) == ["undone-delete"]

    def test_stale_read(self) -> None:
        """A read during the run that returns a value older than one acknowledged before it started."""
        h = History()
        h.op("set", "k", "v1", 1.0, 1.1)
        h.op("set", "k", "v2", 2.0, 2.1)
        h.read("k", "v1", 3.0, 3.1)
        [violation] = check(h.ops).violations
        assert violation.category == "stale-read"
        assert "'v2'" in violation.message

    def test_read_concurrent_with_write(self) -> None:
        """A read that overlaps the write it misses is not stale."""
        h = History()
        h.op("set", "k", "v1", 1.0, 1.1)
        h.op("set", "k", "v2", 2.0, 2.5)
        h.read("k", "v1", 2.4, 2.6)
        assert categories(h) == []

    def test_concurrent_writes_either_order(self) -> None:
        """Two overlapping writes may be ordered either way by their versions."""
        h = History()
        h.op("set", "k", "v1", 1.0, 2.0)
        h.op("set", "k", "v2", 1.5, 2.5)
        h.read("k", "v1", 3.0, 3.1)
        h.read("k", "v1", 4.0, 4.1, client="final")
        assert categories(h) == []

    def test_writes_within_the_margin_count_as_concurrent(self) -> None:
        """Versions come from millisecond clocks: writes closer than the margin may be ordered either way."""
        h = History()
        h.op("set", "k", "v1", 1.0, 1.001)
        h.op("set", "k", "v2", 1.003, 1.004)
        h.read("k", "v1", 2.0, 2.1)
        assert categories(h) == []
        assert categories(h, margin=0.001) == ["stale-read"]

    def test_indeterminate_write_either_way(self) -> None:
        """A write that timed out may or may not have been applied, whenever it is read."""
        h = History()
        h.op("set", "k", "v1", 1.0, 1.1)
        h.op("set", "k", "v2", 2.0, 7.0, outcome=INFO)
        h.op("set", "k", "v3", 8.0, 8.1)
        h.read("k", "v1", 3.0, 3.1)
        h.read("k", "v2", 4.0, 4.1)
        h.read("k", "v2", 9.0, 9.1)  # its version may have been issued after v3's
        assert categories(h) == []

    def test_failed_write_may_be_seen(self) -> None:
        """A write that missed its quorum may sit on one replica and be read; it is not required to be."""
        h = History()
        h.op("set", "k", "v1", 1.0, 1.1)
        h.op("set", "k", "v2", 2.0, 2.1, outcome=FAIL)
        h.read("k", "v2", 3.0, 3.1)
        h.read("k", "v1", 4.0, 4.1, client="final")
        assert categories(h) == []

    def test_failed_write_is_older_than_later_acknowledged_writes(self) -> None:
        """A failed write got its version before its error came back: a later acknowledged set wins."""
        h = History()
        h.op("set", "k", "v1", 1.0, 1.1, outcome=FAIL)
        h.op("set", "k", "v2", 2.0, 2.1)
        h.read("k", "v1", 3.0, 3.1, client="final")
        assert categories(h) == ["lost-write"]

    def test_phantom_read(self) -> None:
        """A value no write produced (or one written only after the read ended) is a phantom."""
        h = History()
        h.read("k", "never", 1.0, 1.1)
        h.op("set", "k", "later", 2.0, 2.1)
        h.read("k", "later", 1.5, 1.6)
        assert categories(h) == ["phantom", "phantom"]

    def test_add_over_acknowledged_value(self) -> None:
        """``add`` answered STORED over a value acknowledged present contradicts the history."""
        h = History()
        h.op("set", "k", "v1", 1.0, 1.1)
        h.op("add", "k", "v2", 2.0, 2.1)
        [violation] = check(h.ops).violations
        assert violation.category == "rmw"
        assert "add #1" in violation.message

    def test_add_not_stored_after_acknowledged_delete(self) -> None:
        """``add`` answered NOT_STORED when the key was acknowledged deleted."""
        h = History()
        h.op("set", "k", "v1", 1.0, 1.1)
        h.op("delete", "k", None, 2.0, 2.1)
        h.op("add", "k", "v2", 3.0, 3.1, result="NOT_STORED")
        assert categories(h) == ["rmw"]

    def test_add_not_stored_on_a_key_never_written(self) -> None:
        """``add`` answered NOT_STORED for a key no write ever reached."""
        h = History()
        h.op("add", "k", "v2", 3.0, 3.1, result="NOT_STORED")
        assert categories(h) == ["rmw"]

    def test_delete_not_found_of_present_key(self) -> None:
        """``delete`` answered NOT_FOUND for a key acknowledged present."""
        h = History()
        h.op("set", "k", "v1", 1.0, 1.1)
        h.op("delete", "k", None, 2.0, 2.1, result="NOT_FOUND")
        assert categories(h) == ["rmw"]

    def test_delete_of_deleted_key(self) -> None:
        """``delete`` answered DELETED for a key an acknowledged delete already removed."""
        h = History()
        h.op("set", "k", "v1", 1.0, 1.1)
        h.op("delete", "k", None, 2.0, 2.1)
        h.op("delete", "k", None, 3.0, 3.1)
        assert categories(h) == ["rmw"]

    def test_delete_racing_an_indeterminate_delete(self) -> None:
        """After a delete that timed out, NOT_FOUND and DELETED are both right."""
        h = History()
        h.op("set", "k", "v1", 1.0, 1.1)
        h.op("delete", "k", None, 2.0, 7.0, outcome=INFO)
        h.op("delete", "k", None, 8.0, 8.1, result="NOT_FOUND")
        h.op("set", "j", "v1", 1.0, 1.1)
        h.op("delete", "j", None, 2.0, 7.0, outcome=INFO)
        h.op("delete", "j", None, 8.0, 8.1)
        assert categories(h) == []


class CounterTests:
    """Counter keys: set to 0 once, then incr and get."""

    def counter(self) -> History:
        h = History()
        h.op("set", "c", "0", 0.0, 0.1, client="setup")
        return h

    def test_clean_counter(self) -> None:
        """Increments answered in order, reads that see them, a final value within the bounds: no violation."""
        h = self.counter()
        h.op("incr", "c", "1", 1.0, 1.1, result="1")
        h.op("incr", "c", "1", 2.0, 2.1, result="2")
        h.op("incr", "c", "1", 3.0, 3.1, outcome=INFO)
        h.read("c", "2", 2.5, 2.6)
        h.read("c", "3", 9.0, 9.1, client="final")
        assert categories(h) == []

    def test_incr_not_found(self) -> None:
        """``incr`` answered NOT_FOUND for a counter acknowledged set."""
        h = self.counter()
        h.op("incr", "c", "1", 1.0, 1.1, result="NOT_FOUND")
        assert categories(h) == ["rmw"]

    def test_duplicate_incr_answers(self) -> None:
        """Two acknowledged increments that answered the same number: one was applied to a stale value."""
        h = self.counter()
        h.op("incr", "c", "1", 1.0, 1.5, result="1")
        h.op("incr", "c", "1", 1.2, 1.6, result="1")
        assert categories(h) == ["rmw"]

    def test_incr_behind_an_earlier_answer(self) -> None:
        """An increment that answers less than one acknowledged before it started."""
        h = self.counter()
        h.op("incr", "c", "1", 1.0, 1.1, result="1")
        h.op("incr", "c", "1", 2.0, 2.1, result="2")
        h.op("incr", "c", "1", 3.0, 3.1, result="2")
        assert categories(h) == ["rmw", "rmw"]  # a duplicate answer, and one behind

    def test_stale_counter_read(self) -> None:
        """A read of a counter below an increment acknowledged before it."""
        h = self.counter()
        h.op("incr", "c", "1", 1.0, 1.1, result="1")
        h.read("c", "0", 2.0, 2.1)
        assert categories(h) == ["stale-read"]

    def test_lost_increments(self) -> None:
        """A final value below the number of acknowledged increments."""
        h = self.counter()
        h.op("incr", "c", "1", 1.0, 1.5, result="1")
        h.op("incr", "c", "1", 1.2, 1.6, result="2")
        h.op("incr", "c", "1", 1.3, 1.7, result="3")
        h.read("c", "3", 9.0, 9.1, client="final")
        assert categories(h) == []
        replicas = [ReplicaState("c", 3, "9-g", "2", ("a", "b", "c"), (), 9.5)]
        assert categories(h, replicas=replicas) == ["lost-write"]

    def test_too_many_increments(self) -> None:
        """A final value above every increment that may have applied."""
        h = self.counter()
        h.op("incr", "c", "1", 1.0, 1.1, result="1")
        h.read("c", "5", 9.0, 9.1, client="final")
        assert categories(h) == ["phantom"]


class ReplicaTests:
    """What the kvstores hold after the run."""

    def test_replica_state_is_a_final_read(self) -> None:
        """The newest record the kvstores hold must not be older than an acknowledged write."""
        h = History()
        h.op("set", "k", "v1", 1.0, 1.1)
        h.op("set", "k", "v2", 2.0, 2.1)
        good = [ReplicaState("k", 3, "2-g", "v2", ("a", "b", "c"), (), 9.0)]
        bad = [ReplicaState("k", 3, "1-g", "v1", ("a", "b", "c"), (), 9.0)]
        assert categories(h, replicas=good) == []
        assert categories(h, replicas=bad) == ["lost-write"]

    def test_under_replicated(self) -> None:
        """A key whose newest record is on fewer than N replicas is a violation, or only reported."""
        h = History()
        h.op("set", "k", "v1", 1.0, 1.1)
        replicas = [ReplicaState("k", 3, "1-g", "v1", ("a", "b"), ("c",), 9.0)]
        report = check(h.ops, replicas=replicas)
        assert [v.category for v in report.violations] == ["under-replicated"]
        assert "missing on c" in report.violations[0].message
        relaxed = check(h.ops, replicas=replicas, report_only=["under-replicated"])
        assert relaxed.ok
        assert relaxed.under_replicated == tuple(replicas)
        assert [v.category for v in relaxed.reported] == ["under-replicated"]
        assert "0 of 1 keys on N replicas" in relaxed.summary()
        assert "under-replicated (reported, not a failure of this run): 1" in relaxed.summary()

    def test_no_record_anywhere_is_not_under_replicated(self) -> None:
        """A key no kvstore holds has nothing to replicate (a lost acknowledged write says so instead)."""
        h = History()
        h.op("set", "k", "v1", 1.0, 1.1, outcome=FAIL)
        replicas = [ReplicaState("k", 3, None, None, (), ("a", "b", "c"), 9.0)]
        assert check(h.ops, replicas=replicas).ok


class ReportTests:
    """The summary and the history files."""

    def test_summary_lists_each_category(self) -> None:
        """The summary counts operations by outcome and names each violation's key."""
        h = History()
        h.op("set", "k", "v1", 1.0, 1.1)
        h.op("set", "j", "v1", 1.0, 1.1)
        h.op("set", "j", "v2", 1.0, 2.1, outcome=INFO)
        h.op("delete", "j", None, 3.0, 3.1, result="NOT_FOUND")
        h.read("k", None, 9.0, 9.1, client="final")
        summary = check(h.ops).summary()
        assert "set           3: 2 ok, 0 fail, 1 info" in summary
        assert "lost-write: 1\n  k: get #4" in summary
        assert "rmw: 1\n  j: delete #3" in summary
        assert "replication: not checked (no replica states)" in summary  # a history alone (--check)

    def test_report_only_keeps_other_categories(self) -> None:
        """Reporting one category only moves that category out of the violations."""
        h = History()
        h.op("set", "k", "v1", 1.0, 1.1)
        h.op("delete", "k", None, 2.0, 2.1, result="NOT_FOUND")
        h.read("k", None, 9.0, 9.1, client="final")
        report = check(h.ops, report_only=["rmw"])
        assert [v.category for v in report.violations] == ["lost-write"]
        assert [v.category for v in report.reported] == ["rmw"]

    def test_history_round_trip(self, tmp_path: Path) -> None:
        """Histories and events written to disk read back equal."""
        recorder = Recorder(clock=iter([10.0, 11.0, 12.5]).__next__)
        invoke = recorder.now()
        op = recorder.record("w1", "gateway-1", "set", "k", "v", invoke, OK, "STORED")
        assert (op.invoke, op.complete) == (1.0, 2.5)
        write_history(tmp_path / "h.jsonl", recorder.ops())
        assert read_history(tmp_path / "h.jsonl") == [op]
        events = [Event("kill", "kvstore-A", 1.0, 5.0, "restarted")]
        write_events(tmp_path / "e.jsonl", events)
        assert read_events(tmp_path / "e.jsonl") == events
