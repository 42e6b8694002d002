"""The private network namespace a fault-injection run lives in, and the links its nemesis cuts.

``run_in_namespace(argv)`` runs ``python -m tests.faults.runner --inside ...`` under ``unshare --net --pid
--fork --mount-proc --kill-child``: a network namespace of its own (only a loopback device, which the runner
brings up) and a PID namespace (with its own /proc) whose first process is the runner, so when the runner
ends (even by SIGKILL, even when ``unshare`` itself is killed) the kernel kills every daemon it started.
Nothing a run does is seen by the host's network: every daemon listens on an address of its own in
127.0.0.0/8, and the firewall rules live in the namespace (``Firewall`` refuses to run in the host's one).

How a link is cut: every daemon runs with a group id of its own (``group_of(address)``, 40000 plus the last
byte of its address). A rule in ``OUTPUT`` marks each new connection with the group id of the process that
opened it (``CONNMARK``; the daemons' outgoing connections all leave from 127.0.0.1, so the source address
cannot tell them apart). Cutting A from B drops, in ``INPUT``, every packet of a connection opened by A
towards B's address or by B towards A's, in both directions, including the connections already open.
That needs real root (to give each daemon its group id): ``preflight()`` says why a run cannot happen here.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SKIP_STATUS",
    "Firewall",
    "Member",
    "block_rule",
    "bring_loopback_up",
    "cut_rules",
    "group_of",
    "iptables_path",
    "mark_rules",
    "namespace_id",
    "preflight",
    "run_in_namespace",
]

#: The runner's exit status when this machine cannot run it (the tests skip with its message).
SKIP_STATUS = 77

_CHAIN = "chashd-cuts"
_GROUP_BASE = 40000

Run = Callable[[Sequence[str]], None]


def group_of(address: str) -> int:
    """The group id (and connection mark) of the daemon listening on ``address`` (127.0.0.x)."""
    parts = address.split(".")
    if len(parts) != 4 or parts[:3] != ["127", "0", "0"] or not parts[3].isdigit():
        raise ValueError(f"{address!r} is not an address of 127.0.0.0/24")
    return _GROUP_BASE + int(parts[3])


@dataclass(frozen=True)
class Member:
    """A daemon as the firewall sees it: its name, its address, and its group id."""

    name: str
    address: str

    @property
    def group(self) -> int:
        """The group id its process runs with; also the mark of the connections it opens."""
        return group_of(self.address)


def mark_rules(members: Iterable[Member]) -> list[list[str]]:
    """The iptables arguments that mark each member's new connections and send ``INPUT`` through the
    chain of cuts. Pure."""
    rules = [["-N", _CHAIN], ["-A", "INPUT", "-j", _CHAIN]]
    for member in sorted(set(members), key=lambda m: m.group):
        rules.append(
            ["-A", "OUTPUT", "-m", "conntrack", "--ctstate", "NEW", "-m", "owner", "--gid-owner", str(member.group)]
            + ["-j", "CONNMARK", "--set-mark", str(member.group)]
        )
    return rules


def block_rule(a: Member, b: Member) -> list[str]:
    """The iptables arguments that drop every packet, either way, of the connections ``a`` opened towards
    ``b`` (those ``b`` opened towards ``a`` still work). Pure."""
    match = ["-m", "connmark", "--mark", str(a.group), "-m", "conntrack", "--ctorigdst", b.address]
    return ["-A", _CHAIN, *match, "-j", "DROP"]


def cut_rules(a: Member, b: Member) -> list[list[str]]:
    """The iptables arguments that cut the link between ``a`` and ``b``: every packet, either way, of the
    connections either opened towards the other. Pure."""
    return [block_rule(a, b), block_rule(b, a)]


def namespace_id() -> str:
    """This process's network namespace (``net:[inode]``)."""
    return os.readlink("/proc/self/ns/net")


def iptables_path() -> str | None:
    """Where iptables is (the sbin directories too: they are not on every user's PATH), or None."""
    return shutil.which("iptables", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def _iptables(args: Sequence[str]) -> None:
    command = [iptables_path() or "iptables", "-w", "5", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")


class Firewall:
    """Cuts and heals links between daemons, with iptables rules in this (private) namespace only.

    ``host_namespace`` is the namespace the run started from; a firewall made in it refuses to change
    anything (so a runner started without ``unshare`` cannot touch the host's rules).
    """

    def __init__(self, host_namespace: str, run: Run = _iptables) -> None:
        if not host_namespace or namespace_id() == host_namespace:
            raise RuntimeError("refusing to change firewall rules outside a private network namespace")
        self._run = run
        #: The rules of each cut link (a frozenset of both ends) or blocked direction (a pair).
        self.cuts: dict[frozenset[Member] | tuple[Member, Member], list[list[str]]] = {}

    def setup(self, members: Iterable[Member]) -> None:
        """Mark the connections of ``members`` (call before any of them starts)."""
        for rule in mark_rules(members):
            self._run(rule)

    def _add(self, key: frozenset[Member] | tuple[Member, Member], rules: list[list[str]]) -> None:
        if key in self.cuts:
            return
        for rule in rules:
            self._run(rule)
        self.cuts[key] = rules

    def _remove(self, key: frozenset[Member] | tuple[Member, Member]) -> None:
        for rule in self.cuts.pop(key, []):
            self._run(["-D", *rule[1:]])

    def cut(self, a: Member, b: Member) -> None:
        """Cut the link between ``a`` and ``b`` (already open connections included)."""
        if a != b:
            self._add(frozenset((a, b)), cut_rules(a, b))

    def uncut(self, a: Member, b: Member) -> None:
        """Restore the link between ``a`` and ``b``."""
        self._remove(frozenset((a, b)))

    def block(self, a: Member, b: Member) -> None:
        """Cut the connections ``a`` opens towards ``b`` only (a one-way fault: ``b`` still reaches ``a``)."""
        if a != b:
            self._add((a, b), [block_rule(a, b)])

    def unblock(self, a: Member, b: Member) -> None:
        """Undo ``block(a, b)``."""
        self._remove((a, b))

    def isolate(self, member: Member, others: Iterable[Member]) -> None:
        """Cut every link between ``member`` and ``others``."""
        for other in others:
            self.cut(member, other)

    def heal(self) -> None:
        """Remove every cut."""
        if self.cuts:
            self._run(["-F", _CHAIN])
            self.cuts.clear()


def bring_loopback_up() -> None:
    """Set the namespace's loopback device up (a new namespace starts with it down)."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s.fileno(), siocgifflags, request)[:18])[1]
        fcntl.ioctl(s.fileno(), siocsifflags, struct.pack("16sH", b"lo", flags | iff_up))


def preflight() -> str | None:
    """Why a fault-injection run cannot happen on this machine, or None when it can (from the host side)."""
    if sys.platform != "linux":
        return "fault injection needs Linux network namespaces"
    if shutil.which("unshare") is None:
        return "fault injection needs unshare (util-linux)"
    iptables = iptables_path()
    if iptables is None:
        return "fault injection needs iptables (./dev.sh test installs it: apt-get install iptables)"
    if os.geteuid() != 0:
        return (
            "fault injection needs root: each daemon runs with a group id of its own so that iptables can tell "
            "its connections apart (unshare --map-root-user maps one group only)"
        )
    probe = subprocess.run(
        [
            "unshare",
            "--net",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
            iptables,
            "-w",
            "5",
            "-L",
            "OUTPUT",
            "-n",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        return f"cannot use iptables in a private network namespace: {probe.stderr.strip()[:300]}"
    return None


def run_in_namespace(
    argv: Sequence[str], cwd: Path, timeout: float, echo: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the runner with ``argv`` in a private network and PID namespace, its output captured (and
    printed as it comes when ``echo``); at most ``timeout`` seconds, then it is stopped, and with it every
    process of the namespace."""
    command = [
        "unshare",
        "--net",
        "--pid",
        "--fork",
        "--mount-proc",  # /proc of the namespace's pids (the runner reads its daemons' CPU time)
        "--kill-child=SIGTERM",  # when unshare dies, the runner gets SIGTERM and stops its daemons
        sys.executable,
        "-m",
        "tests.faults.runner",
        "--inside",
        namespace_id(),
        *argv,
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), env.get("PYTHONPATH", "")]))
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    status: int | None
    try:
        status = process.wait(timeout)
    except subprocess.TimeoutExpired:
        _stop(process)
        lines.append(f"(the run took more than {timeout:g}s and was stopped)\n")
        status = -1
    except BaseException:
        _stop(process)
        raise
    reader.join(60.0)
    return subprocess.CompletedProcess(command, status, "".join(lines), "")


def _stop(unshare: subprocess.Popen[str], grace: float = 60.0) -> None:
    """Stop a run: unshare ignores SIGTERM while its child runs, so SIGKILL it (the runner then gets
    SIGTERM and stops its daemons); after ``grace`` seconds SIGKILL the runner too, the first process of
    its PID namespace, which takes every process of the namespace with it."""
    runner = _child_of(unshare.pid)
    unshare.kill()
    unshare.wait()
    deadline = time.monotonic() + grace
    while runner is not None and _alive(runner) and time.monotonic() < deadline:
        time.sleep(0.2)
    if runner is not None and _alive(runner):
        os.kill(runner, signal.SIGKILL)


def _child_of(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
