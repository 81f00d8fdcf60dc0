"""Fault injection on real lab processes: signals by PID and network partitions with iptables.

Partitions use uid ownership, not addresses: unbound client sockets (ZooKeeper peers, asyncpg,
most drivers) leave from 127.0.0.1, so address-pair rules would not cut them. Every POM server's
processes run under their own uid (``uid_base + N``), and rules in a private chain hooked into
``OUTPUT -o lo`` drop what that uid sends. Dropping only the sender's packets is enough to cut a
TCP conversation both ways; replies on sockets another uid accepted are owned by that uid, which is
why a two-way cut adds the reverse rule.

``Firewall`` is a context manager: everything it added is removed on exit, also when a test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

from pom_ha.infra.process import InfraError, ProcessRecord, signal_process

#: one chain per test session when several run on one machine (``POM_FIREWALL_CHAIN``)
CHAIN = os.environ.get("POM_FIREWALL_CHAIN", "POMHA-LAB")


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("iptables") or "/usr/sbin/iptables"
    res = subprocess.run([exe, "-w", *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise InfraError(f"iptables {' '.join(args)} failed: {res.stderr.strip()}")
    return res


class Firewall:
    """Owner-based DROP rules on loopback, all in one private chain."""

    def __init__(self, chain: str = CHAIN) -> None:
        self.chain = chain
        self._installed = False

    def install(self) -> None:
        if _iptables("-n", "-L", self.chain, check=False).returncode != 0:
            _iptables("-N", self.chain)
        hook = ["OUTPUT", "-o", "lo", "-j", self.chain]
        if _iptables("-C", *hook, check=False).returncode != 0:
            _iptables("-I", *hook)
        self._installed = True

    def drop_from_uid(self, uid: int, dest: str, dport: int | None = None) -> list[str]:
        """Drop every loopback packet a process of ``uid`` sends to ``dest`` (optionally one port); returns
        the rule, which :meth:`delete` takes to remove this one rule alone."""
        rule = ["-m", "owner", "--uid-owner", str(uid), "-d", dest]
        if dport is not None:
            rule += ["-p", "tcp", "--dport", str(dport)]
        _iptables("-A", self.chain, *rule, "-j", "DROP")
        return rule

    def delete(self, rule: list[str]) -> None:
        """Remove one rule :meth:`drop_from_uid` added (a no-op when it is gone already)."""
        while _iptables("-C", self.chain, *rule, "-j", "DROP", check=False).returncode == 0:
            _iptables("-D", self.chain, *rule, "-j", "DROP", check=False)

    def cut_uid_from_address(self, uid: int, dest: str, dest_uids: list[int] | None = None,
                             own_addresses: list[str] | None = None) -> None:
        """Cut ``uid`` from ``dest`` both ways: its packets to ``dest``, and packets of ``dest_uids``
        (the processes behind ``dest``) to ``own_addresses``."""
        self.drop_from_uid(uid, dest)
        for other in dest_uids or []:
            for addr in own_addresses or []:
                self.drop_from_uid(other, addr)

    def heal(self) -> None:
        """Remove every rule (the chain and hook stay until :meth:`remove`)."""
        _iptables("-F", self.chain, check=False)

    def remove(self) -> None:
        _iptables("-D", "OUTPUT", "-o", "lo", "-j", self.chain, check=False)
        _iptables("-F", self.chain, check=False)
        _iptables("-X", self.chain, check=False)
        self._installed = False

    def rules(self) -> list[str]:
        res = _iptables("-S", self.chain, check=False)
        return [line for line in res.stdout.splitlines() if line.startswith("-A")]

    def __enter__(self) -> Firewall:
        self.install()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.remove()


def pause(rec: ProcessRecord) -> bool:
    """SIGSTOP: the process freezes with its sockets open (a long GC pause, a stalled VM)."""
    return signal_process(rec, signal.SIGSTOP)


def resume(rec: ProcessRecord) -> bool:
    return signal_process(rec, signal.SIGCONT)


@contextmanager
def paused(rec: ProcessRecord) -> Iterator[None]:
    pause(rec)
    try:
        yield
    finally:
        resume(rec)
