"""N "hosts" as network namespaces on one bridge, for fault tests and benchmarks.

A :class:`Hosts` topology builds one namespace per host and a hub namespace
holding a bridge; each host has one veth link into the bridge, and the hub has
an address on the bridge too, so a client running in the hub reaches every
host, and the hosts reach each other, all on one subnet::

                    hub namespace ("client", 10.78.0.254)
                    bridge br0: h1 h2 h3 ...
                     /          |          \\
      host "a" 10.78.0.1   host "b" 10.78.0.2   host "c" 10.78.0.3 ...

Nothing is added to the namespace the caller runs in.  Names carry the
creator's pid and a random suffix (``pbkvhub-<pid>-<hex>``, ``pbkvh1-<pid>-<hex>``,
...), so topologies of concurrent runs never meet; addresses are per namespace,
so every topology can use the same subnet.

Faults, as iptables rules inside the host namespaces (nothing leaks out):

* :meth:`Hosts.isolate`: DROP every packet, both ways, between a host and every
  other host except those it is kept reachable from (by default the client in
  the hub), silently; established connections hang as on a real partition;
* :meth:`Hosts.heal`: remove every rule again.

Run things in a host with :meth:`Hosts.command` (an ``ip netns exec`` prefix),
:meth:`Hosts.run` (wait for it) or :meth:`Hosts.popen` (in the background,
killed at teardown); make the calling thread's own sockets live in a namespace
with :meth:`Hosts.inside` (threads started meanwhile stay there)::

    reason = available()            # None, or why this machine cannot do it
    with Hosts(["etcd", "m1", "m2"]) as net, net.inside(CLIENT):
        net.popen("m1", ["redis-server", "--bind", net.addresses["m1"]])
        net.isolate("m1")           # m1 reaches no other host; the client still reaches it
        net.heal()

:meth:`Hosts.destroy` (the context manager's exit, and interpreter exit for a
topology still built) kills every process still running in the namespaces,
whoever started it (daemons too: ``ip netns pids``), then deletes them with
their links and rules; it is idempotent and safe after a partial build.

Needs root, ``ip`` (iproute2), ``iptables`` and bridge support in the kernel.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from typing import Any, Self

from pbkv.launcher import process_alive
from pbkv.testing.netns import Namespaces, TopologyError, _tool, refusal, remove_stale

__all__ = ["CLIENT", "Hosts", "TopologyError", "available"]

CLIENT = "client"  # the hub namespace's name as a host: where the test client runs
SUBNET = "10.78.0"
PREFIX_LENGTH = 24
HUB_HOST = 254  # the hub's address on the bridge: SUBNET.254
BRIDGE = "br0"
HOST_LINK = "eth0"  # each host's end of its veth link
MAX_HOSTS = 253
_COMMAND_TIMEOUT = 20.0
_built: set[Hosts] = set()


class Hosts(Namespaces):
    """Hosts in namespaces on one bridge, and a hub for the client; see the module
    docstring.  ``hosts`` is a list of names or a count (names ``h1``, ``h2``, ...)."""

    def __init__(self, hosts: Sequence[str] | int, prefix: str = "pbkv") -> None:
        names = [f"h{i}" for i in range(1, hosts + 1)] if isinstance(hosts, int) else list(hosts)
        if not 1 <= len(names) <= MAX_HOSTS:
            raise ValueError(f"between 1 and {MAX_HOSTS} hosts")
        if len(set(names)) != len(names) or CLIENT in names:
            raise ValueError(f"host names must be distinct and not {CLIENT!r}")
        self.hosts = tuple(names)
        # The creator's pid lets a later run delete what a killed run left behind.
        suffix = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.namespaces = {CLIENT: f"{prefix}hub-{suffix}"}
        self.addresses = {CLIENT: f"{SUBNET}.{HUB_HOST}"}
        for index, name in enumerate(names, start=1):
            self.namespaces[name] = f"{prefix}h{index}-{suffix}"
            self.addresses[name] = f"{SUBNET}.{index}"
        self.isolated: dict[str, frozenset[str]] = {}  # host -> what still reaches it
        self._ip = _tool("ip") or "ip"
        self._iptables = _tool("iptables") or "iptables"
        self._iptables_restore = _tool("iptables-restore") or "iptables-restore"
        self._made: list[str] = []
        self._processes: list[subprocess.Popen[Any]] = []

    # -- lifecycle ----------------------------------------------------------------------
    def create(self) -> Self:
        """Build the topology (deleting first what killed runs left behind)."""
        remove_stale()
        _built.add(self)
        try:
            self._build()
        except BaseException:
            self.destroy()
            raise
        return self

    def _build(self) -> None:
        hub = self.namespaces[CLIENT]
        for name in (CLIENT, *self.hosts):
            self._ip_cmd("netns", "add", self.namespaces[name])
            self._made.append(self.namespaces[name])
            self._ip_cmd("-n", self.namespaces[name], "link", "set", "lo", "up")
        self._ip_cmd("-n", hub, "link", "add", BRIDGE, "type", "bridge")
        self._ip_cmd("-n", hub, "addr", "add", self._cidr(CLIENT), "dev", BRIDGE)
        self._ip_cmd("-n", hub, "link", "set", BRIDGE, "up")
        for index, name in enumerate(self.hosts, start=1):
            ns, port = self.namespaces[name], f"h{index}"
            self._ip_cmd(
                "link", "add", HOST_LINK, "netns", ns, "type", "veth",
                "peer", "name", port, "netns", hub,
            )  # fmt: skip
            self._ip_cmd("-n", hub, "link", "set", port, "master", BRIDGE)
            self._ip_cmd("-n", hub, "link", "set", port, "up")
            self._ip_cmd("-n", ns, "addr", "add", self._cidr(name), "dev", HOST_LINK)
            self._ip_cmd("-n", ns, "link", "set", HOST_LINK, "up")

    def _cidr(self, name: str) -> str:
        return f"{self.addresses[name]}/{PREFIX_LENGTH}"

    def destroy(self) -> None:
        """Kill every process in the namespaces, then delete them (their links and
        rules go with them)."""
        self._kill_everything()
        errors = []
        while self._made:
            name = self._made.pop()
            result = self._run([self._ip, "netns", "del", name], check=False)
            if result.returncode != 0 and os.path.exists(f"/run/netns/{name}"):
                errors.append(f"{name}: {result.stderr.strip()}")
        _built.discard(self)
        if errors:
            raise TopologyError("could not delete namespaces: " + "; ".join(errors))

    def _kill_everything(self) -> None:
        pids: set[int] = {p.pid for p in self._processes if p.poll() is None}
        for name in self._made:
            listed = self._run([self._ip, "netns", "pids", name], check=False)
            pids.update(int(word) for word in listed.stdout.split() if word.isdigit())
        pids.discard(os.getpid())
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)  # nothing, but harmless on a stopped one
        for process in self._processes:  # reap our own children
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
        self._processes.clear()
        deadline = time.monotonic() + 5
        while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.01)

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``host``'s namespace in the background.  ``ip netns
        exec`` execs it, so the process's pid is the command's own (kill -9 hits
        it); :meth:`destroy` kills it if it still runs."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        process = subprocess.Popen(self.command(host, *argv), **kwargs)
        self._processes.append(process)
        return process

    def pids(self, host: str) -> list[int]:
        """Every process living in ``host``'s namespace."""
        listed = self._run([self._ip, "netns", "pids", self.namespaces[host]], check=False)
        return [int(word) for word in listed.stdout.split() if word.isdigit()]

    # -- faults ---------------------------------------------------------------------------
    def isolate(self, host: str, keep_reachable_from: str | Iterable[str] = CLIENT) -> None:
        """Drop every packet between ``host`` and every other host, both ways,
        except the hosts in ``keep_reachable_from`` (by default the client's hub).
        The rules live in ``host``'s namespace: it sends nothing to the others and
        takes nothing from them.  The rules land at once (one ``iptables-restore``)."""
        keep = (
            {keep_reachable_from}
            if isinstance(keep_reachable_from, str)
            else set(keep_reachable_from)
        )
        unknown = ({host} | keep) - set(self.addresses)
        if unknown or host == CLIENT:
            raise ValueError(f"cannot isolate {host!r} keeping {sorted(keep)}")
        rules = ["*filter"]
        for other in self.addresses:
            if other == host or other in keep:
                continue
            address = self.addresses[other]
            rules += [f"-A INPUT -s {address} -j DROP", f"-A OUTPUT -d {address} -j DROP"]
        rules.append("COMMIT")
        # One iptables-restore: every rule lands at once (the partition starts whole).
        argv = self.command(host, self._iptables_restore, "-w", "--noflush")
        result = subprocess.run(
            argv,
            input="\n".join(rules) + "\n",
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT,
        )
        if result.returncode != 0:
            raise TopologyError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
        self.isolated[host] = frozenset(keep)

    def heal(self) -> None:
        """Remove every rule a fault added: every host reaches every other again."""
        for host in self.isolated:
            for chain in ("INPUT", "OUTPUT"):
                self._iptables_cmd(host, "-F", chain)
        self.isolated.clear()

    def rules(self) -> str:
        """The iptables rules of every host (for failure messages)."""
        out = []
        for host in self.hosts:
            listed = self.run(host, self._iptables, "-w", "-S", check=False)
            out.append(f"# {host}\n{listed.stdout.strip()}")
        return "\n".join(out)

    # -- plumbing ---------------------------------------------------------------------------
    def _iptables_cmd(self, host: str, *args: str) -> None:
        self.run(host, self._iptables, "-w", *args)


@atexit.register
def _destroy_leftovers() -> None:
    for hosts in list(_built):
        with contextlib.suppress(TopologyError, OSError, subprocess.SubprocessError):
            hosts.destroy()


def _exercise(net: Hosts) -> None:
    net.isolate("h1")
    net.heal()
    with net.inside(CLIENT):
        pass


@functools.cache
def available() -> str | None:
    """None when this machine can build a :class:`Hosts` topology and isolate a
    host, else the reason why not (for ``pytest.skip``)."""
    return refusal(
        ("ip", "iptables", "iptables-restore"), lambda: Hosts(2, prefix="pbkvprobe"), _exercise
    )
