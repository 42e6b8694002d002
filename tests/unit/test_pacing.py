"""The handoff's pacing (chashd.kvstore.pacing): units of work, one per reactor iteration, sized to a budget."""

from __future__ import annotations

from collections.abc import Iterator

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from chashd.kvstore.pacing import Pacer, Sizer


def iterate(clock: Clock) -> None:
    """One iteration of the reactor's timed calls on ``clock``: as the reactor does, only the calls that were
    due when the iteration began run (a call made meanwhile waits for the next one; ``Clock.advance`` would
    run it too)."""
    for call in [c for c in clock.calls if c.getTime() <= clock.seconds()]:
        if call.active():
            clock.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)


def units(name: str, count: int, log: list[str]) -> Iterator[None]:
    """``count`` units, each logging ``name`` and its number."""
    for i in range(count):
        log.append(f"{name}{i}")
        if i + 1 < count:
            yield None


def outcome(d: Deferred[None]) -> list[object]:
    """What ``d`` fired with so far: [] while it waits, [None] once done, [Failure] once failed."""
    seen: list[object] = []
    d.addBoth(seen.append)
    return seen


class PacerTests:
    """``Pacer``: every iterator under way shares one unit per reactor iteration."""

    def test_one_unit_per_iteration_whatever_the_iterators(self) -> None:
        """Three iterators under way: each iteration of the reactor runs one unit of one of them, in turn;
        each ``run`` fires once its iterator is exhausted, and no timer is left."""
        clock = Clock()
        pacer = Pacer(clock)
        log: list[str] = []
        done = [outcome(pacer.run(units(name, count, log))) for name, count in (("a", 2), ("b", 3), ("c", 1))]
        assert log == []
        for expected in (["a0"], ["a0", "b0"], ["a0", "b0", "c0"], ["a0", "b0", "c0", "a1"]):
            iterate(clock)
            assert log == expected
        assert done == [[None], [], [None]]
        iterate(clock)
        iterate(clock)
        assert log[4:] == ["b1", "b2"] and done[1] == [None]
        assert clock.getDelayedCalls() == []

    def test_a_unit_that_raises_fails_its_run_only(self) -> None:
        """The error of a unit fails its own ``run``; the other iterators go on."""
        clock = Clock()
        pacer = Pacer(clock)
        log: list[str] = []

        def broken() -> Iterator[None]:
            yield None
            raise ValueError("broken unit")

        failed = outcome(pacer.run(broken()))
        done = outcome(pacer.run(units("a", 2, log)))
        for _ in range(4):
            iterate(clock)
        assert isinstance(failed[0], Failure) and failed[0].check(ValueError)
        assert log == ["a0", "a1"] and done == [None]

    def test_stop_all_cancels_every_iterator(self) -> None:
        """``stop_all`` fails every ``run`` under way with CancelledError (all of them: Twisted's
        ``Cooperator.stop`` would skip every other one), runs no further unit and leaves no timer; the
        pacer takes new iterators afterwards."""
        clock = Clock()
        pacer = Pacer(clock)
        log: list[str] = []
        runs = [outcome(pacer.run(units(name, 5, log))) for name in "abcd"]
        iterate(clock)
        pacer.stop_all()
        assert all(len(seen) == 1 and isinstance(seen[0], Failure) and seen[0].check(CancelledError) for seen in runs)
        assert clock.getDelayedCalls() == []
        iterate(clock)
        assert log == ["a0"]
        later = outcome(pacer.run(units("e", 1, log)))
        iterate(clock)
        assert later == [None] and log == ["a0", "e0"]


class SizerTests:
    """``Sizer``: the records a unit takes follow the time budget."""

    def test_sizer_follows_the_budget(self) -> None:
        """A unit's size moves halfway toward what the budget allows, within 1 and the maximum; a unit
        timed at nothing doubles it; a short tail changes nothing."""
        sizer = Sizer(100, 400, 0.001)
        sizer.took(100, 0.004)  # 40 us a record: 25 fit in the budget
        assert sizer.size == 62
        sizer.took(10, 1.0)
        assert sizer.size == 62
        sizer.took(62, 0.0)
        assert sizer.size == 93
        for _ in range(10):
            sizer.took(sizer.size, 0.0)
        assert sizer.size == 400
        for _ in range(20):
            sizer.took(sizer.size, 10.0)
        assert sizer.size == 1

    def test_sizer_minimum(self) -> None:
        """With a minimum, slow units (a loaded machine's) shrink the size to the minimum, never below; a
        minimum above the initial size is the initial size."""
        sizer = Sizer(100, 400, 0.001, minimum=32)
        for _ in range(20):
            sizer.took(sizer.size, 10.0)
        assert sizer.size == 32
        small = Sizer(2, 400, 0.001, minimum=32)
        small.took(2, 10.0)
        assert small.size == 2
