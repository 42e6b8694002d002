"""Read leases of a kvstore (``chashd.leases.LeaseTable``): who may read and store a key for a read-modify-write."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from chashd.leases import CLOCK_BOUND, MAX_LEASE, LeaseTable

T = 1_700_000_000.0


def table(max_keys: int = 100) -> LeaseTable:
    """A table whose start was long ago (no start-up block)."""
    return LeaseTable(T - 100, max_keys=max_keys)


class LeaseTableTests(SynchronousTestCase):
    """Shared leases coexist; an exclusive one excludes every other holder's; each lasts until its deadline
    plus twice the clock bound; a start or a full table grants nothing for as long as a forgotten one runs."""

    def test_shared_leases_coexist(self) -> None:
        """Two commands at the map's primary read the key at once: both leases are granted."""
        t = table()
        assert t.request(b"k", "gw1:1", T + 2, False, T) is None
        assert t.request(b"k", "gw2:1", T + 2, False, T) is None

    def test_exclusive_waits_for_every_other_lease(self) -> None:
        """A failover's exclusive request while another command's shared lease lasts is refused with the time
        that lease ends (its deadline plus twice the bound); its own shared lease does not count."""
        t = table()
        assert t.request(b"k", "gw1:1", T + 2, False, T) is None
        assert t.request(b"k", "gw2:1", T + 2.3, False, T + 0.3) is None
        assert t.request(b"k", "gw1:1", T + 2.5, True, T + 0.5) == T + 2.3 + 2 * CLOCK_BOUND
        assert t.request(b"k", "gw1:1", T + 5, True, T + 2.3 + 2 * CLOCK_BOUND) is None
        assert t.request(b"other", "gw3:1", T + 5, True, T + 3) is None  # other keys are free

    def test_exclusive_refuses_everyone_else_until_it_ends(self) -> None:
        """While an exclusive lease lasts, other holders' shared and exclusive requests are refused, and so
        are their stores (``conflict``); the holder's own requests and stores pass."""
        t = table()
        assert t.request(b"k", "gw1:1", T + 2, True, T) is None
        end = T + 2 + 2 * CLOCK_BOUND
        assert t.request(b"k", "gw2:1", T + 3, False, T + 1) == end
        assert t.request(b"k", "gw2:1", T + 3, True, T + 1) == end
        assert t.conflict(b"k", "gw2:1", False, T + 1) == end
        assert t.conflict(b"k", "gw1:1", True, T + 1) is None
        assert t.request(b"k", "gw2:1", T + 3, False, end) is None  # ended

    def test_an_exclusive_store_meets_shared_leases(self) -> None:
        """A failover's copy to a replica that another command has read (and may still store at) conflicts;
        a shared store does not meet a shared lease."""
        t = table()
        assert t.request(b"k", "gw2:1", T + 2, False, T) is None
        assert t.conflict(b"k", "gw1:1", True, T + 1) == T + 2 + 2 * CLOCK_BOUND
        assert t.conflict(b"k", "gw1:1", False, T + 1) is None
        assert t.conflict(b"unleased", "gw1:1", True, T + 1) is None

    def test_nothing_granted_after_a_start(self) -> None:
        """A kvstore that just started may have forgotten leases: none granted, every store conflicts, for
        the longest a lease lasts."""
        t = LeaseTable(T)
        end = T + MAX_LEASE + 2 * CLOCK_BOUND
        assert t.request(b"k", "gw1:1", T + 2, False, T + 1) == end
        assert t.conflict(b"k", "gw1:1", False, T + 1) == end
        assert t.request(b"k", "gw1:1", end + 2, False, end) is None

    def test_a_full_table_forgets_and_blocks(self) -> None:
        """Past ``max_keys`` expired leases go first; when the live ones fill it, the oldest half is
        forgotten and nothing is granted until the last of them would have ended."""
        t = table(max_keys=4)
        for i in range(4):
            assert t.request(b"k%d" % i, "gw1:1", T + 1, False, T) is None
        assert t.request(b"k4", "gw1:1", T + 9, False, T + 2) is None  # the four expired: purged
        assert len(t) == 1
        for i in range(5, 8):
            assert t.request(b"k%d" % i, "gw1:1", T + 3, False, T + 2) is None
        assert t.request(b"k8", "gw1:1", T + 3, False, T + 2) == T + 9 + 2 * CLOCK_BOUND
        assert len(t) == 2
        assert t.request(b"k9", "gw1:1", T + 12, False, T + 9 + 2 * CLOCK_BOUND) is None

    def test_a_release_ends_the_lease(self) -> None:
        """A command that is over says so (``XRelease``): its lease ends at once, and another holder's exclusive
        request is granted; a release of a holder with no lease, or of an unleased key, changes nothing."""
        t = table()
        assert t.request(b"k", "gw1:1", T + 2, False, T) is None
        assert t.request(b"k", "gw2:1", T + 2, True, T) is not None
        t.release(b"k", "gw3:1", None, T + 2)
        t.release(b"other", "gw1:1", None, T + 2)
        t.release(b"k", "gw1:1", None, T + 2)
        assert len(t) == 0
        assert t.request(b"k", "gw2:1", T + 2, True, T) is None

    def test_a_release_with_a_floor(self) -> None:
        """A command that may have left an unacknowledged result (its version's milliseconds: the floor) keeps
        its lease until the clock passes the floor plus twice the bound, when that is sooner than its end;
        a floor past the end changes nothing."""
        t = table()
        assert t.request(b"k", "gw1:1", T + 2, False, T) is None
        t.release(b"k", "gw1:1", T + 0.1, T + 2)
        end = T + 0.1 + 2 * CLOCK_BOUND
        assert t.request(b"k", "gw2:1", T + 2, True, T + 0.2) == end
        assert t.request(b"k", "gw2:1", T + 2, True, end) is None
        assert t.request(b"j", "gw1:2", T + 2, False, T) is None
        t.release(b"j", "gw1:2", T + 5, T + 2)
        assert t.conflict(b"j", "gw2:1", True, T + 1) == T + 2 + 2 * CLOCK_BOUND

    def test_a_release_leaves_a_later_round_alone(self) -> None:
        """A release names the last round's deadline its gateway sent to this kvstore: a lease a later round of
        the same command took (its request overtook the release on another connection) stays; the release
        of that round ends it."""
        t = table()
        assert t.request(b"k", "gw1:1", T + 2, True, T) is None
        assert t.request(b"k", "gw1:1", T + 2.1, True, T + 0.1) is None  # the next round, first to arrive
        t.release(b"k", "gw1:1", None, T + 2)
        assert t.conflict(b"k", "gw2:1", False, T + 0.2) == T + 2.1 + 2 * CLOCK_BOUND
        t.release(b"k", "gw1:1", None, T + 2.1)
        assert t.conflict(b"k", "gw2:1", False, T + 0.2) is None

    def test_shared_leases_of_two_map_epochs_conflict(self) -> None:
        """Shared leases of commands run by one map epoch coexist; a shared request or store of another epoch
        meets them (a gateway a map behind may name another primary); epoch 0 (unknown) meets none by epoch."""
        t = table()
        assert t.request(b"k", "gw1:1", T + 2, False, T, 5) is None
        assert t.request(b"k", "gw2:1", T + 2, False, T, 5) is None
        assert t.request(b"k", "gw3:1", T + 2, False, T, 6) == T + 2 + 2 * CLOCK_BOUND
        assert t.conflict(b"k", "gw3:1", False, T, 4) == T + 2 + 2 * CLOCK_BOUND
        assert t.conflict(b"k", "gw3:1", False, T, 5) is None
        assert t.request(b"k", "gw4:1", T + 2, False, T, 0) is None
        assert t.request(b"j", "gw1:1", T + 2, False, T, 5) is None
        assert t.conflict(b"j", "gw1:1", False, T, 6) is None  # the holder's own lease
