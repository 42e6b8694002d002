# -*- test-case-name: tests.unit.test_leases -*-
"""Read leases: what keeps two primaries of one key from both acknowledging a read-modify-write.

The hole this closes (W1). Gateways on the same map epoch agree on a key's primary P (its first up replica),
where read-modify-writes are serialized: P runs each ``xapply`` on the record it holds. A gateway that times
P out (``primary_timeout``) runs its command at the next replica Q instead, while another gateway may still
wait on P: once P resumes it applies that gateway's command on its own record, which lacks Q's result. The
epoch fence does not see it (the map did not change); both results are acknowledged and one increment is
lost, and a result refused everywhere but P stays there with a newer version than the acknowledged one and
wins later comparisons (read repair, anti-entropy).

And this one (W2). A map ``e + 1`` marks the key's primary X down (node states only). A gateway still on ``e``
reads X and Y (shared: X is its map's primary) and applies at X, which has not learnt ``e + 1`` (only gateways
on ``e`` reach it); a gateway on ``e + 1`` applies at Y (shared: the map's primary now) and is acknowledged.
The late copies are refused by the replicas that know ``e + 1`` (the epoch fence), so the late command fails,
but X keeps its result, computed without the acknowledged one and with a version that may be newer: a fork
that wins later comparisons. Shared leases of two primaries do not conflict, so nothing ordered the two.

The rule.

- Each round of a command (its reads, then its command and the copies of its result) has a *deadline*
  ``d`` = the gateway's clock at the round's start plus ``LEASE_FOR`` (2 s). Its reads are ``xlease``
  requests: the kvstore answers the record as ``xget`` does and remembers that the key is leased to the
  command (its ``holder`` id) until ``d + 2e`` by its own clock, ``e`` the bound on the difference between
  any two nodes' clocks (``CLOCK_BOUND``, 250 ms). Its stores (the ``xapply`` at its primary, every copy of
  its result) name ``d``, the holder and the mode (``xdeadline``): a kvstore refuses a store once its clock
  is past ``d``, and an ``xapply`` whose version's milliseconds are past ``d`` (``DeadlinePassed``).
- A command whose primary is the map's (the first up replica: every gateway on the epoch agrees on it)
  is *shared*. Any other (a failover: the map's primary was timed out, failed, or is stalled for this
  gateway) is *exclusive*: it takes its leases on ``max(W, N - W + 1)`` replicas of the key, its primary
  among them, all in the round whose result it applies (a failover during the read or the command starts
  one more round for it: the failover path pays a round trip, the common path none). Every lease and store
  carries the map epoch its command runs by: the epoch its connection named (``xmap``) for an ``xlease``
  and an ``xapply``, the ``xfence`` of a copy (0: none named, a gateway of an earlier version).
- *Conflict*: another holder's unexpired exclusive lease on the key; for an exclusive request or store,
  another holder's unexpired lease of either mode; and another holder's unexpired lease of another map
  epoch (both known). A kvstore refuses a lease request or a store that meets a
  conflict (``KeyLeased``, with the time the conflicting lease ends); the command gives up what its round
  got, waits (a poll, below, or until then) and starts its round over (a new deadline), up to its retry
  bound. A refusal anywhere in a round starts it over, so the round whose result is applied got every lease
  it asked for. (A gateway also lets its own exclusive commands of one key take turns before they ask:
  fewer refusals, nothing the argument relies on.)
- A command whose primary may have applied it (the command was sent and not answered) runs it at another
  node only after a new round, exclusive whatever its primary, and fails (``the value may or may not have
  changed``) when that round reads a version as new as the one it sent: the first attempt may have been
  applied and built upon.
- A kvstore that takes a command's store (runs its ``xapply``, or takes or already holds newer than its copy)
  ends that command's lease on the key there. A command that is over (acknowledged, failed, or changed
  nothing) ends its leases everywhere else with ``xrelease`` (``LeaseTable.release``), and so does a round
  refused for another's lease, before it reads again (two commands that each got some of their leases do
  not hold each other up). Unless its result was acknowledged, a release names a *floor* ``f``: the newest
  version (milliseconds) the command may have left without acknowledgement (an ``xapply`` sent and not
  answered, a result whose copies were refused; none when every ``xapply`` it sent was answered, refused
  or changing nothing): its lease there then lasts until ``min(d, f) + 2e``. A release names the deadline
  of the last round it covers: a later round's lease (its request overtook the release on another
  connection) stays. A command refused for a lease reads again after 5 ms, doubling, or when that lease's
  end comes, if sooner (``Router.lease_poll``): it learns of an early end within a poll.
- A kvstore that starts has forgotten its leases: until ``MAX_LEASE + 2e`` after it starts (it refuses
  deadlines more than ``MAX_LEASE`` ahead, so every command that read it before is dead by then) every
  request and store meets a conflict. A full lease table forgets its oldest keys the same way.

Why it holds (clocks within ``e`` of each other; every command reads ``N - W + 1`` replicas):

1. *How a lease ends.* Once a lease of command C at replica X has run out by X's clock (``d + 2e``), every
   clock is past ``d + e``, so every kvstore refuses C's stores: C is *dead*. A lease that ended earlier did
   so (a) because X took C's store: C had applied its command then (a copy follows the command), and X
   holds C's result or a newer record; or (b) C released it, acknowledged: its result was on ``W`` replicas
   before the release left (C answers only then), and every version it sent before is older (its gateway's
   clock picked them earlier); or (c) released without a floor, not acknowledged: every ``xapply`` C sent
   was answered without storing a new version (a catch-up or a repair stores a record read, no new one),
   and C sends no more in that round; or (d) released with the floor ``f`` once X's clock passed
   ``f + 2e``: every version C may have stored, or may still store (an ``xapply`` or a copy on the way),
   is at most ``f``, and every clock is past ``f + e``. In (c) and (d) a refused round of C stores nothing,
   and C applies only in a round that gets all its leases again.
2. *Exclusion.* Let F be exclusive (or shared, and C of another map epoch: every lease and store of the one
   conflicts with the other's, as with an exclusive one), its applied round granted leases on a set LF of at
   least ``max(W, N - W + 1)`` replicas (a shared command reads ``max(N - W + 1, R, W)``), and C any other
   command (round) that stores. C's leases were granted at
   some Y in LF (its reads meet every ``W`` replicas, and LF meets every ``N - W + 1``: the two commands'
   maps differ by node states at most, 7, so both sets are in the same preference list). (a) If Y granted C
   before F, F's grant at Y waited for C's lease there to end (1): C is dead, or Y took C's store first and
   F reads C's result at Y (so F computes on it, and its version is newer than C's: the gateway's clock
   observes the versions it reads), or C was acknowledged (F reads its result on one of its ``W``
   replicas: those stores were taken before Z granted F, see next), or C stored nothing, or all C left is
   at most ``f`` and F's version is newer (4). C's stores at a Z in LF came before Z granted F (after it they
   meet F's exclusive lease, which lasts past C's death, as F's grants come before its deadline): F's read
   of Z sees them; a late one elsewhere meets F's newer record. (b) If Y granted F before C, C's grant
   waited for F's lease to end (F is dead before C's read at Y, or Y took F's store and C reads F's result
   there, or F was acknowledged and C reads its result, or F stored nothing, or F's leftovers are older
   than C's version), and each of F's stores at a replica C reads came before C's read there (after it
   they meet C's lease). Two shared commands of one map epoch apply at the same primary P, which runs each
   on the record it holds: the later on the earlier's result.
3. *The second sees the first.* An acknowledged result is on ``W`` replicas; the other command reads
   ``N - W + 1`` (or LF), so by 2 it reads that result or a newer one, catches its primary up to the newest
   (``XPut``) and computes on it. The acknowledged results form one chain, each computed on the one before:
   at most one of two results computed on the same record is acknowledged.
4. *Forks lose.* A result stored but not acknowledged and not built upon (a fork) belongs to the command
   that came first in 2, so its version is at most that command's deadline ``d1`` (a kvstore refuses an
   ``xapply`` past it), and at most its floor ``f1`` when its lease ended by a release (1 d). The second
   picks its version after a replica's clock passed ``min(d1, f1) + 2e``, so with its own clock past
   ``min(d1, f1) + e``, and a version is at least the clock that picks it: newer than the fork, and so is
   everything later computed on it. Last writer wins by version in read repair, the primary's
   catch-up, anti-entropy, the handoff and copies: the fork loses every comparison.
5. *Copies that meet a newer record.* A copy answered ``EXISTS`` (the replica holds a newer record) counts
   as stored: while its command can store, no command that excludes it has stored anything at that
   replica (2), and a newer record of a shared command was computed at P on this result. After the
   deadline the copy is refused instead: a false failure (``the value may or may not have changed``),
   never a false acknowledgement.
6. *A command applied twice.* The first attempt (its xapply not answered) may have been applied at the
   old node and built upon by another command C. C excludes the new, exclusive round (2): if C came
   first, the new round reads C's acknowledged result, or its fork when that is on the new primary (which
   is among the leased replicas), both newer than the attempt, and fails; a fork elsewhere loses (4). If
   C came second, it reads the new round's result and builds on that. The attempt itself, applied late,
   is a fork older than the new round's result (the same gateway's clock picked both).
7. *Two maps.* A command runs by one map: its ``xapply`` and its reads are sent only while its gateway
   routes by that map (a placement that changes before the command is sent starts it over, its reads
   included), after that map's ``xmap`` on the connection, and its copies name it (``xfence``). So each
   round's leases and stores carry one epoch, and two shared commands with two primaries, whose maps name
   two primaries, carry two epochs: they conflict as in 2, however many maps apart (a gateway a map behind,
   two behind, one that skipped a map, a follower cut off from its gateway). Their lease sets meet when
   the two maps differ by node states (both in the key's preference list); across a ring change the epoch
   fence and the previous owners' reads order them, as before. A command that started over by a newer map
   takes its leases again with that epoch (a holder's lease keeps its newest). Not covered: gateways that
   name no epoch and kvstores that take no leases (earlier versions), where the window is as open as before.

Pure: time comes in as an argument (seconds, the kvstore's clock).
"""

from __future__ import annotations

__all__ = ["CLOCK_BOUND", "LEASE_FOR", "MAX_LEASE", "MAX_LEASED_KEYS", "LeaseTable"]

#: The bound assumed on the difference between any two nodes' clocks (seconds).
CLOCK_BOUND = 0.25
#: How long after its round starts a read-modify-write's deadline is (the gateway's choice, seconds).
LEASE_FOR = 2.0
#: The furthest ahead of a kvstore's clock a deadline may be (seconds; a longer one is refused).
MAX_LEASE = 3.0
#: Keys a kvstore keeps leases of at most; past it the oldest are forgotten (see ``LeaseTable``).
MAX_LEASED_KEYS = 65536


class LeaseTable:
    """One kvstore's leases: key -> {holder: (until, exclusive, epoch)}, in seconds of the kvstore's clock.

    ``request`` grants a lease or refuses it, ``conflict`` says whether a store may go on; a refusal is the
    time the conflicting lease ends. ``epoch`` is the cluster map epoch the command runs by (the ``xmap`` of
    its connection, the ``xfence`` of a copy; 0: unknown, conflicting by epoch with nothing). Bounded: past
    ``max_keys`` keys, expired entries are purged, then the oldest keys forgotten, and until the latest
    forgotten lease would have ended every request and store conflicts (``blocked_until``), as after a start.
    """

    __slots__ = ("_leases", "blocked_until", "max_keys", "skew")

    def __init__(self, started: float, skew: float = CLOCK_BOUND, max_keys: int = MAX_LEASED_KEYS) -> None:
        self.skew = skew
        self.max_keys = max_keys
        self._leases: dict[bytes, dict[str, tuple[float, bool, int]]] = {}
        #: Nothing is granted before this time: leases held before a start (or forgotten) may still run.
        self.blocked_until = started + MAX_LEASE + 2 * skew

    def __len__(self) -> int:
        return len(self._leases)

    def conflict(self, key: bytes, holder: str, exclusive: bool, now: float, epoch: int = 0) -> float | None:
        """When the lease that ``holder``'s request or store of ``key`` conflicts with ends (another holder's
        exclusive lease, with ``exclusive`` any other holder's, and any other holder's of another known map
        epoch), or None: no conflict."""
        if now < self.blocked_until:
            return self.blocked_until
        held = self._leases.get(key)
        if held is None:
            return None
        end = 0.0
        for other, (until, other_exclusive, other_epoch) in list(held.items()):
            if until <= now:
                del held[other]
            elif (
                other != holder
                and (exclusive or other_exclusive or epoch != other_epoch and epoch and other_epoch)
                and until > end
            ):
                end = until
        if not held:
            del self._leases[key]
        return end or None

    def request(
        self, key: bytes, holder: str, deadline: float, exclusive: bool, now: float, epoch: int = 0
    ) -> float | None:
        """Lease ``key`` to ``holder`` until ``deadline`` plus twice the clock bound (None), or refuse: the
        time the conflicting lease ends."""
        refused = self.conflict(key, holder, exclusive, now, epoch)
        if refused is not None:
            return refused
        held = self._leases.get(key)
        if held is None:
            if len(self._leases) >= self.max_keys:
                self._make_room(now)
                if now < self.blocked_until:
                    return self.blocked_until
            held = self._leases[key] = {}
        until = deadline + 2 * self.skew
        mine = held.get(holder)
        if mine is not None:  # the holder's next round: the later end, exclusive if either is, its epoch
            until = max(until, mine[0])
            exclusive = exclusive or mine[1]
        held[holder] = (until, exclusive, epoch)
        return None

    def release(self, key: bytes, holder: str, floor: float | None = None, deadline: float | None = None) -> None:
        """``holder`` stored its result here (``XApply`` run, or a copy taken), or is over (``XRelease``): its
        lease on ``key`` here ends; with ``floor`` (the newest version, in seconds, it may have stored
        anywhere), once the clock passes ``floor`` plus twice the clock bound, if that is sooner. With
        ``deadline`` (an ``XRelease``: the last round's deadline it sent here), a lease that a later round
        took is left alone (that round's request came first on another connection)."""
        held = self._leases.get(key)
        if held is None:
            return
        mine = held.get(holder)
        if mine is None or deadline is not None and mine[0] > deadline + 2 * self.skew:
            return
        if floor is not None:
            until = floor + 2 * self.skew
            if until < mine[0]:
                held[holder] = (until, mine[1], mine[2])
            return
        del held[holder]
        if not held:
            del self._leases[key]

    def _make_room(self, now: float) -> None:
        """Purge expired leases; if the table is still full, forget its oldest half and block until the last
        of them would have ended."""
        leases = self._leases
        for key in [k for k, held in leases.items() if all(entry[0] <= now for entry in held.values())]:
            del leases[key]
        if len(leases) < self.max_keys:
            return
        for key in list(leases)[: max(1, self.max_keys // 2)]:
            for entry in leases.pop(key).values():
                self.blocked_until = max(self.blocked_until, entry[0])
