"""The launcher contract every real server of the lab follows.

A launcher owns one server process of one POM server: it renders its configuration from
``config/templates``, starts it (as the POM server's own uid when ``runs_as_server_uid``), decides
readiness with one protocol-level probe (never a sleep), reports a role/state for ``infra status``,
and stops it by PID.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
from abc import ABC, abstractmethod
from pathlib import Path
from string import Template
from typing import ClassVar

from pom_ha.config import REPO_ROOT, ServerSection, Topology
from pom_ha.infra.process import (
    InfraError,
    ProcessRecord,
    kill_process,
    log_tail,
    read_record,
    start_process,
    stop_process,
)

TEMPLATES = REPO_ROOT / "config" / "templates"
JVM_LIBS = REPO_ROOT / ".jvm"


def jvm_libs() -> Path:
    """Folder of the Maven-fetched server jars (``POM_JVM_DIR`` overrides ``<repo>/.jvm``)."""
    return Path(os.environ.get("POM_JVM_DIR") or JVM_LIBS)

# Java 17 module openings Ignite and ActiveMQ need (Ignite's jvmdefaults.sh list, a superset for ActiveMQ).
JAVA17_OPENS = [
    "--add-opens=java.base/jdk.internal.access=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens=java.base/sun.util.calendar=ALL-UNNAMED",
    "--add-opens=java.management/com.sun.jmx.mbeanserver=ALL-UNNAMED",
    "--add-opens=jdk.internal.jvmstat/sun.jvmstat.monitor=ALL-UNNAMED",
    "--add-opens=java.base/sun.reflect.generics.reflectiveObjects=ALL-UNNAMED",
    "--add-opens=jdk.management/com.sun.management.internal=ALL-UNNAMED",
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/java.nio=ALL-UNNAMED",
    "--add-opens=java.base/java.net=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent.locks=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.invoke=ALL-UNNAMED",
    "--add-opens=java.base/java.math=ALL-UNNAMED",
    "--add-opens=java.sql/java.sql=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens=java.base/java.time=ALL-UNNAMED",
    "--add-opens=java.base/java.text=ALL-UNNAMED",
    "--add-opens=java.management/sun.management=ALL-UNNAMED",
    "--add-opens=java.desktop/java.awt.font=ALL-UNNAMED",
]


def render_template(name: str, dest: Path, **values: object) -> Path:
    """Render ``config/templates/<name>`` with ``$name`` placeholders into ``dest`` (only if changed)."""
    text = Template((TEMPLATES / name).read_text()).substitute({k: str(v) for k, v in values.items()})
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists() or dest.read_text() != text:
        dest.write_text(text)
    return dest


def port_in_use(host: str, port: int) -> bool:
    """True when something accepts or holds ``host:port`` (we try to bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


async def tcp_exchange(host: str, port: int, payload: bytes, timeout_s: float = 2.0) -> bytes:
    """Send ``payload``, read until EOF or timeout; b'' when unreachable."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, TimeoutError):
        return b""
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), timeout_s)
    except (OSError, TimeoutError):
        return b""
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


def java_bin() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    found = shutil.which("java")
    if not found:
        raise InfraError("java not found: run scripts/install (Java 17 is required)")
    return found


def jvm_classpath(group: str) -> str:
    d = jvm_libs() / group
    jars = sorted(d.glob("*.jar"))
    if not jars:
        raise InfraError(f"no jars in {d}: run scripts/install to fetch the {group} server from Maven Central")
    return ":".join(str(j) for j in jars)


class Launcher(ABC):
    """One server process of the lab."""

    kind: ClassVar[str]
    #: run under the POM server's uid (uid_base + N) so lab faults can target it with iptables owner rules
    runs_as_server_uid: ClassVar[bool] = True
    start_timeout_s: ClassVar[float] = 90.0
    #: the server's main configuration file in ``conf/`` (its path is the process marker); None: it has none
    config_name: ClassVar[str | None] = None

    def __init__(self, topo: Topology, server: ServerSection) -> None:
        self.topo = topo
        self.server = server

    # ---- identity and paths -------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"{self.kind}-{self.server.name}"

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def lab_dir(self) -> Path:
        return self.topo.lab_dir()

    @property
    def run_dir(self) -> Path:
        return self.lab_dir / "run"

    @property
    def home(self) -> Path:
        """Private folder of this process: conf/, data/ and anything it writes."""
        return self.lab_dir / self.server.name / self.kind

    @property
    def conf_dir(self) -> Path:
        return self.home / "conf"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def config_path(self) -> Path:
        if self.config_name is None:
            raise TypeError(f"{self.kind}: this server has no configuration file")
        return self.conf_dir / self.config_name

    @property
    def log_path(self) -> Path:
        return self.lab_dir / "logs" / f"{self.name}.log"

    @property
    def user(self) -> tuple[int, int] | None:
        """The (uid, gid) the process is started as: the POM server's own uid when we run as root (the lab,
        where uids tell the servers of one host apart); None (our own uid) otherwise, e.g. the ``pomha``
        user of a VM's systemd units, which holds one POM server alone and may not change uid."""
        if not self.runs_as_server_uid or os.geteuid() != 0:
            return None
        uid = self.topo.server_uid(self.server.name)
        return (uid, uid)

    # ---- what subclasses provide ----------------------------------------------------------------
    @abstractmethod
    def listen_ports(self) -> list[tuple[str, int]]:
        """Every address:port this server binds; the first is the one shown by ``infra status``."""

    @abstractmethod
    def prepare(self) -> None:
        """Render configs and create data folders (idempotent)."""

    @abstractmethod
    def argv(self) -> list[str]:
        """The command line; it must contain :pyattr:`marker`."""

    @abstractmethod
    async def probe(self) -> bool:
        """One readiness check on the server's own protocol."""

    async def role(self) -> str:
        """State shown by ``infra status`` (leader/follower, controller, master/slave...)."""
        return "up" if await self.probe() else "not ready"

    def env(self) -> dict[str, str]:
        return {"HOME": str(self.home)}

    @property
    def marker(self) -> str:
        """What identifies the process in ``ps`` (its configuration file, else its home)."""
        return str(self.config_path) if self.config_name is not None else str(self.home)

    # ---- lifecycle -------------------------------------------------------------------------------
    def record(self) -> ProcessRecord | None:
        return read_record(self.run_dir, self.name)

    def running(self) -> bool:
        rec = self.record()
        return rec is not None and rec.alive()

    def _own_home(self) -> None:
        if self.user is None or os.geteuid() != 0:
            return
        uid, gid = self.user
        for root, dirs, files in os.walk(self.home):
            os.chown(root, uid, gid)
            for n in dirs + files:
                os.chown(os.path.join(root, n), uid, gid, follow_symlinks=False)

    def start(self) -> ProcessRecord:
        if self.running():
            rec = self.record()
            assert rec is not None
            return rec
        for host, port in self.listen_ports():
            if port_in_use(host, port):
                raise InfraError(f"{self.name}: {host}:{port} is already in use by another process")
        self.home.mkdir(parents=True, exist_ok=True)
        self.prepare()
        self._own_home()
        return start_process(
            self.name,
            self.argv(),
            run_dir=self.run_dir,
            log_path=self.log_path,
            marker=self.marker,
            env=self.env(),
            cwd=self.home,
            user=self.user,
        )

    async def wait_ready(self, timeout_s: float | None = None) -> float:
        """Poll :meth:`probe` until it passes; returns seconds waited. Raises with the log tail."""
        deadline = time.monotonic() + (timeout_s or self.start_timeout_s)
        t0 = time.monotonic()
        while True:
            if await self.probe():
                return time.monotonic() - t0
            rec = self.record()
            if rec is None or not rec.alive():
                raise InfraError(f"{self.name} exited during start; last log lines:\n{log_tail(self.log_path)}")
            if time.monotonic() > deadline:
                raise InfraError(
                    f"{self.name} not ready after {timeout_s or self.start_timeout_s:.0f} s; "
                    f"last log lines:\n{log_tail(self.log_path)}"
                )
            await asyncio.sleep(0.2)

    def stop(self, timeout_s: float = 20.0) -> None:
        rec = self.record()
        if rec is not None:
            stop_process(rec, self.run_dir, timeout_s)

    def kill(self) -> None:
        """SIGKILL for fault injection; the pid file stays so ``start`` can bring it back."""
        rec = self.record()
        if rec is not None:
            kill_process(rec)
        # the main thread can be reaped before the kernel has closed every socket of the process
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and any(port_in_use(h, p) for h, p in self.listen_ports()):
            time.sleep(0.05)
