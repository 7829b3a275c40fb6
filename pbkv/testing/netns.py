"""Network namespaces for fault tests: the primary and the backup on two "hosts".

A :class:`Topology` builds three network namespaces on this machine and wires
them with veth pairs; nothing is added to the namespace the caller runs in::

        client namespace (test process)
        10.77.1.254           10.77.2.254
            |                       |
        10.77.1.1               10.77.2.2
      primary ns --- server link --- backup ns
      10.77.0.1                     10.77.0.2

The server link carries only replication traffic (the two server addresses,
``10.77.0.0/24``); each server has its own client link, so a fault on the
server link leaves the test client able to reach both servers.  The client
namespace routes to each server address over that server's client link and
does not forward, so it never becomes a detour between the servers.

Faults act on the server link only:

* :meth:`Topology.cut` / :meth:`Topology.heal`: ``ip link set down`` / ``up``
  on both ends (each side then gets "network unreachable");
* :meth:`Topology.partition_drop`: iptables DROP both ways, silent;
* :meth:`Topology.drop_from` / :meth:`Topology.undrop_from`: iptables DROP of
  what one server sends to the other, the other direction left working;
* :meth:`Topology.partition_reject`: iptables REJECT with a TCP reset, fast;
* :meth:`Topology.loss`: iptables ``-m statistic --mode random`` DROP;
* :meth:`Topology.rate_limit`: iptables ``-m hashlimit`` DROP above a byte rate;
* :meth:`Topology.clear_rules`: remove every rule again.

iptables rules live in the server namespaces (each namespace has its own
tables), so nothing leaks into the host.  Run processes in a namespace with
:meth:`Topology.command` / :meth:`Topology.run` (``ip netns exec``); make the
calling thread's own sockets live in one with :meth:`Topology.inside` (threads
started meanwhile stay there)::

    reason = available()            # None, or why this machine cannot do it
    with Topology() as net, net.inside("client"):
        subprocess.run(net.command("primary", "bin/start_server", "-p", ...))
        net.partition_drop()
        ...
        net.clear_rules()

A :class:`NamespacePair` is a :class:`~pbkv.testing.cluster.LocalPair` whose
primary and backup run in the topology's two server namespaces, on the server
addresses; talk to it from the client namespace.

Needs root, ``ip`` (iproute2) and ``iptables``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Self, TypeVar

from pbkv.launcher import process_alive
from pbkv.stages import Role
from pbkv.testing.cluster import LocalPair

__all__ = [
    "CLIENT_ADDRESS",
    "ROLES",
    "NamespacePair",
    "SERVER_ADDRESSES",
    "Topology",
    "TopologyError",
    "available",
    "remove_stale",
]

ROLES = ("primary", "backup", "client")
SERVER_ADDRESSES = {"primary": "10.77.0.1", "backup": "10.77.0.2"}
SERVER_PREFIX = 24
# Client links: client namespace <-> primary, client namespace <-> backup.
CLIENT_LINKS = {
    "primary": ("10.77.1.254", "10.77.1.1"),
    "backup": ("10.77.2.254", "10.77.2.2"),
}
CLIENT_ADDRESS = CLIENT_LINKS["primary"][0]
# Interface names inside each namespace (every namespace has its own name space).
SERVER_LINK = {"primary": "to-backup", "backup": "to-primary"}
TO_CLIENT = "to-client"
TO_SERVER = {"primary": "to-primary", "backup": "to-backup"}

_COMMAND_TIMEOUT = 20.0
_CLONE_NEWNET = 0x40000000
_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


class TopologyError(RuntimeError):
    """A command that builds or changes the topology failed."""


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=_SBIN)


def _setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at ``fd``."""
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, _CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


@contextlib.contextmanager
def _entered(path: str) -> Iterator[None]:
    """Run the body with the calling thread in the namespace bound at ``path``."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


class Namespaces:
    """What every topology of network namespaces shares: ``namespaces`` (a name for
    each namespace, as the caller knows it, to the system's name), running
    commands in them, a thread's sockets inside one, and building and destroying
    under a ``with`` block (``create`` / ``destroy``, by the subclass)."""

    namespaces: dict[str, str]
    _ip: str

    def create(self) -> Self:
        raise NotImplementedError

    def destroy(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.create()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    def command(self, name: str, *argv: str) -> list[str]:
        """``argv`` prefixed to run in ``name``'s namespace (for ``subprocess``)."""
        return [self._ip, "netns", "exec", self.namespaces[name], *argv]

    def run(
        self, name: str, *argv: str, check: bool = True, timeout: float = _COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``name``'s namespace and wait for it."""
        return self._run(self.command(name, *argv), check=check, timeout=timeout)

    def inside(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Context manager: the calling thread's new sockets live in ``name``'s
        namespace until the block ends (threads started inside stay there)."""
        return _entered(f"/run/netns/{self.namespaces[name]}")

    def _ip_cmd(self, *args: str) -> None:
        self._run([self._ip, *args])

    @staticmethod
    def _run(
        argv: Sequence[str], check: bool = True, timeout: float = _COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if check and result.returncode != 0:
            raise TopologyError(
                f"{' '.join(argv)} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()}"
            )
        return result


class Topology(Namespaces):
    """Three namespaces (primary, backup, client) and the links between them.

    Names get the creator's pid and a random suffix (``pbkvp-<pid>-<hex>``,
    ``pbkvb-…``, ``pbkvc-…``), so topologies of concurrent test runs never
    meet.  ``create()`` builds it (the context manager does that), and first
    deletes what killed runs left behind; ``destroy()`` removes every namespace
    and with them every link and rule; it is idempotent and safe after a
    partial ``create()``.
    """

    def __init__(self, prefix: str = "pbkv") -> None:
        # The creator's pid lets a later run delete what a killed run left behind.
        suffix = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.namespaces = {
            "primary": f"{prefix}p-{suffix}",
            "backup": f"{prefix}b-{suffix}",
            "client": f"{prefix}c-{suffix}",
        }
        self.addresses = dict(SERVER_ADDRESSES)
        self._ip = _tool("ip") or "ip"
        self._iptables = _tool("iptables") or "iptables"
        self._made: list[str] = []
        self.link_up = True

    # -- lifecycle -------------------------------------------------------------------
    def create(self) -> Self:
        remove_stale()
        try:
            self._build()
        except BaseException:
            self.destroy()
            raise
        return self

    def _build(self) -> None:
        ns = self.namespaces
        for role in ROLES:
            self._ip_cmd("netns", "add", ns[role])
            self._made.append(ns[role])
            self._ip_cmd("-n", ns[role], "link", "set", "lo", "up")
        # The server link, created directly inside the two server namespaces.
        self._veth("primary", SERVER_LINK["primary"], "backup", SERVER_LINK["backup"])
        for role in ("primary", "backup"):
            address = f"{self.addresses[role]}/{SERVER_PREFIX}"
            self._ip_cmd("-n", ns[role], "addr", "add", address, "dev", SERVER_LINK[role])
        # One client link per server.
        for role in ("primary", "backup"):
            client_side, server_side = CLIENT_LINKS[role]
            self._veth("client", TO_SERVER[role], role, TO_CLIENT)
            self._ip_cmd(
                "-n", ns["client"], "addr", "add", f"{client_side}/24", "dev", TO_SERVER[role]
            )
            self._ip_cmd("-n", ns[role], "addr", "add", f"{server_side}/24", "dev", TO_CLIENT)
        for role, devices in (
            ("primary", (SERVER_LINK["primary"], TO_CLIENT)),
            ("backup", (SERVER_LINK["backup"], TO_CLIENT)),
            ("client", tuple(TO_SERVER.values())),
        ):
            for device in devices:
                self._ip_cmd("-n", ns[role], "link", "set", device, "up")
        for role in ("primary", "backup"):
            self._ip_cmd(
                "-n",
                ns["client"],
                "route",
                "add",
                f"{self.addresses[role]}/32",
                "via",
                CLIENT_LINKS[role][1],
            )

    def _veth(self, role_a: str, name_a: str, role_b: str, name_b: str) -> None:
        self._ip_cmd(
            "link", "add", name_a, "netns", self.namespaces[role_a], "type", "veth",
            "peer", "name", name_b, "netns", self.namespaces[role_b],
        )  # fmt: skip

    def destroy(self) -> None:
        """Delete the namespaces (their links and rules go with them)."""
        errors = []
        while self._made:
            name = self._made.pop()
            result = self._run([self._ip, "netns", "del", name], check=False)
            if result.returncode != 0 and os.path.exists(f"/run/netns/{name}"):
                errors.append(f"{name}: {result.stderr.strip()}")
        if errors:
            raise TopologyError("could not delete namespaces: " + "; ".join(errors))

    # -- faults on the server link ---------------------------------------------------------
    def cut(self) -> None:
        """Take the server link down at both ends; the client links stay up."""
        for role in ("primary", "backup"):
            self._ip_cmd("-n", self.namespaces[role], "link", "set", SERVER_LINK[role], "down")
        self.link_up = False

    def heal(self) -> None:
        """Bring the server link back up (routes come back with it)."""
        for role in ("primary", "backup"):
            self._ip_cmd("-n", self.namespaces[role], "link", "set", SERVER_LINK[role], "up")
        self.link_up = True

    def partition_drop(self) -> None:
        """Silently drop every packet between the two servers, both ways."""
        self._filter(["-j", "DROP"], ["-j", "DROP"])

    def drop_from(self, sender: str) -> None:
        """Silently drop every packet ``sender`` sends to the other server, on
        arrival (as if lost on the wire: the sender's own stack sees no error)."""
        self.run(*self._drop_from(sender, "-A"))

    def undrop_from(self, sender: str) -> None:
        """Remove the rule :meth:`drop_from` added, and only it."""
        self.run(*self._drop_from(sender, "-D"))

    def _drop_from(self, sender: str, verb: str) -> tuple[str, ...]:
        if sender not in SERVER_ADDRESSES:
            raise ValueError("sender must be primary or backup")
        receiver = Role(sender).peer.value
        me, them = self.addresses[receiver], self.addresses[sender]
        return (receiver, self._iptables, "-w", verb, "INPUT", "-s", them, "-d", me, "-j", "DROP")

    def partition_reject(self) -> None:
        """Answer every TCP segment between the servers with a reset: whatever a
        side sends resets its connection at once, a connect is refused."""
        for role, peer in (("primary", "backup"), ("backup", "primary")):
            me, them = self.addresses[role], self.addresses[peer]
            # The resets themselves must get through (REJECT never answers one).
            self._rule(
                role, "INPUT", them, me, ["-p", "tcp", "--tcp-flags", "RST", "RST", "-j", "ACCEPT"]
            )
            self._rule(
                role, "INPUT", them, me, ["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"]
            )
            self._rule(role, "INPUT", them, me, ["-j", "DROP"])

    def loss(self, percent: float) -> None:
        """Drop ``percent`` % of the packets in each direction, at random."""
        if not 0 <= percent <= 100:
            raise ValueError("percent must be between 0 and 100")
        probability = f"{percent / 100:.4f}"
        # On the sender's side only, so each direction loses `percent`, not more.
        for role, peer in (("primary", "backup"), ("backup", "primary")):
            self._rule(role, "OUTPUT", self.addresses[role], self.addresses[peer], [
                "-m", "statistic", "--mode", "random", "--probability", probability, "-j", "DROP",
            ])  # fmt: skip

    def rate_limit(self, sender: str, kbytes_per_second: int) -> None:
        """Drop what ``sender`` sends to the other server beyond this rate (after a
        burst of one second's worth): TCP then slows down to about that rate."""
        if sender not in SERVER_ADDRESSES or kbytes_per_second < 1:
            raise ValueError("sender must be primary or backup, the rate at least 1 kB/s")
        peer = Role(sender).peer
        rate = f"{kbytes_per_second}kb"
        self._rule(sender, "OUTPUT", self.addresses[sender], self.addresses[peer], [
            "-m", "hashlimit", "--hashlimit-name", f"pbkv-{sender}",
            "--hashlimit-above", f"{rate}/s", "--hashlimit-burst", rate, "-j", "DROP",
        ])  # fmt: skip

    def clear_rules(self) -> None:
        """Remove every rule that a fault method added."""
        for role in ("primary", "backup"):
            for chain in ("INPUT", "OUTPUT"):
                self.run(role, self._iptables, "-w", "-F", chain)

    def rules(self) -> str:
        """The iptables rules of both server namespaces (for failure messages)."""
        out = []
        for role in ("primary", "backup"):
            listed = self.run(role, self._iptables, "-w", "-S", check=False)
            out.append(f"# {role}\n{listed.stdout.strip()}")
        return "\n".join(out)

    def _filter(self, outgoing: list[str], incoming: list[str]) -> None:
        for role, peer in (("primary", "backup"), ("backup", "primary")):
            me, them = self.addresses[role], self.addresses[peer]
            self._rule(role, "OUTPUT", me, them, outgoing)
            self._rule(role, "INPUT", them, me, incoming)

    def _rule(self, role: str, chain: str, source: str, dest: str, action: list[str]) -> None:
        self.run(role, self._iptables, "-w", "-A", chain, "-s", source, "-d", dest, *action)


class NamespacePair(LocalPair):
    """A :class:`LocalPair` whose servers run in ``net``'s primary and backup
    namespaces: the real scripts under ``ip netns exec``, each server on its own
    server address.  Every method that talks to a server must run in the client
    namespace (``net.inside("client")``)."""

    def __init__(self, net: Topology, directory: str | os.PathLike[str], **settings: str) -> None:
        self.net = net
        addresses = {"primary": net.addresses["primary"], "backup": net.addresses["backup"]}
        super().__init__(directory, **{**addresses, **settings})

    def command(self, action: str, role: str, *extra: str) -> list[str]:
        return self.net.command(role, *super().command(action, role, *extra))


# This module's namespaces (primary, backup, client) and pbkv.testing.hosts' (hub, hosts).
_OURS = re.compile(r"^pbkv(?:probe)?(?:[pbc]|hub|h\d+)-(\d+)-[0-9a-f]+$")


def remove_stale() -> list[str]:
    """Delete the namespaces of topologies whose creating process is gone (a test
    run that was killed before its clean-up), killing what still runs in them
    first; returns their names."""
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return []
    removed = []
    for name in names:
        match = _OURS.match(name)
        if match is None or process_alive(int(match.group(1))):
            continue
        ip = _tool("ip") or "ip"
        listed = Topology._run([ip, "netns", "pids", name], check=False)
        for pid in (int(word) for word in listed.stdout.split() if word.isdigit()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        result = Topology._run([ip, "netns", "del", name], check=False)
        if result.returncode == 0:
            removed.append(name)
    return removed


N = TypeVar("N", bound=Namespaces)
_PACKAGES = {"ip": "iproute2", "iptables": "iptables", "iptables-restore": "iptables"}


def refusal(
    tools: Sequence[str], make: Callable[[], N], exercise: Callable[[N], None]
) -> str | None:
    """Why this machine cannot build a topology (None: it can): Linux, root, each
    of ``tools``, and one topology (``make``) built and its faults applied
    (``exercise``) must all work."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces and iptables need root"
    for tool in tools:
        if _tool(tool) is None:
            return f"the {tool} command is missing (apt-get install {_PACKAGES[tool]})"
    if not os.path.exists("/proc/thread-self/ns/net"):
        return "/proc/thread-self/ns/net is missing: cannot switch network namespaces"
    net = make()
    try:
        exercise(net.create())
    except (OSError, subprocess.SubprocessError, TopologyError) as exc:
        return f"the kernel or the tools refused a network namespace set-up: {exc}"
    finally:
        with contextlib.suppress(TopologyError, OSError, subprocess.SubprocessError):
            net.destroy()
    return None


def _exercise(net: Topology) -> None:
    net.partition_reject()
    net.loss(10)
    net.clear_rules()
    net.cut()
    net.heal()
    with net.inside("client"):
        pass


@functools.cache
def available() -> str | None:
    """None when this machine can build a :class:`Topology` and apply every fault,
    else the reason why not (for ``pytest.skip``)."""
    return refusal(("ip", "iptables"), lambda: Topology(prefix="pbkvprobe"), _exercise)
