"""The lab's private PostgreSQL cluster: initdb'd under the lab folder, run as the ``postgres`` user.

PostgreSQL refuses to run as root, so the cluster is owned by and started as ``postgres``; it listens
only on the topology's PostgreSQL address (and a private unix socket used for bootstrap).
"""

from __future__ import annotations

import glob
import os
import pwd
import subprocess
from pathlib import Path
from typing import ClassVar

import asyncpg

from pom_ha.config import ServerSection, Topology
from pom_ha.db.migrate import migrate
from pom_ha.infra.base import Launcher
from pom_ha.infra.process import InfraError

_PG_CONF = """\
listen_addresses = '{address}'
port = {port}
unix_socket_directories = '{sock}'
max_connections = 400
shared_buffers = 128MB
# a lab cluster: durability of the last second is traded for speed; a clean stop loses nothing
fsync = off
synchronous_commit = off
full_page_writes = off
logging_collector = off
log_min_messages = warning
log_line_prefix = '%m [%p] '
tcp_keepalives_idle = 5
tcp_keepalives_interval = 2
tcp_keepalives_count = 3
"""

_HBA = """\
local   all   all                 trust
host    all   all   127.0.0.0/8   scram-sha-256
"""


def pg_bindir() -> Path:
    """Newest installed PostgreSQL server binaries (Debian keeps them under /usr/lib/postgresql/N/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise InfraError("PostgreSQL server not installed: run scripts/install (apt package postgresql)")
    return Path(found[-1]).parent


class PostgresLauncher(Launcher):
    kind = "postgres"
    runs_as_server_uid = False
    start_timeout_s: ClassVar[float] = 60.0

    def __init__(self, topo: Topology) -> None:
        super().__init__(topo, ServerSection(name="pgdb", address=topo.postgres.address))

    @property
    def name(self) -> str:
        return "postgres"

    @property
    def home(self) -> Path:
        return self.lab_dir / "postgres"

    @property
    def socket_dir(self) -> Path:
        return self.home / "sock"

    @property
    def user(self) -> tuple[int, int] | None:
        pw = pwd.getpwnam("postgres")
        return (pw.pw_uid, pw.pw_gid)

    def listen_ports(self) -> list[tuple[str, int]]:
        return [(self.topo.postgres.address, self.topo.postgres.port)]

    @property
    def marker(self) -> str:
        return str(self.data_dir)

    def prepare(self) -> None:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if not (self.data_dir / "PG_VERSION").exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._chown_all()
            uid, gid = self.user or (0, 0)
            res = subprocess.run(
                [
                    "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                    str(pg_bindir() / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                    "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync",
                ],
                capture_output=True,
                text=True,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            )
            if res.returncode != 0:
                raise InfraError(f"initdb failed:\n{res.stdout}\n{res.stderr}")
        pg = self.topo.postgres
        (self.data_dir / "postgresql.auto.conf").write_text("")
        (self.data_dir / "postgresql.conf").write_text(
            _PG_CONF.format(address=pg.address, port=pg.port, sock=self.socket_dir)
        )
        (self.data_dir / "pg_hba.conf").write_text(_HBA)

    def _chown_all(self) -> None:
        uid, gid = self.user or (0, 0)
        for p in [self.home, *self.home.rglob("*")]:
            try:
                os.chown(p, uid, gid, follow_symlinks=False)
            except FileNotFoundError:
                pass

    def _own_home(self) -> None:
        self._chown_all()

    def argv(self) -> list[str]:
        return [str(pg_bindir() / "postgres"), "-D", str(self.data_dir)]

    def env(self) -> dict[str, str]:
        return {"LANG": "C.UTF-8", "HOME": str(self.home)}

    async def _admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(
            host=str(self.socket_dir), port=self.topo.postgres.port, user="postgres",
            database="postgres", timeout=2,
        )

    async def probe(self) -> bool:
        try:
            conn = await self._admin()
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False
        try:
            return bool(await conn.fetchval("SELECT NOT pg_is_in_recovery()"))
        finally:
            await conn.close()

    async def role(self) -> str:
        return "primary" if await self.probe() else "not ready"

    async def bootstrap(self) -> list[int]:
        """Create the application role and database if missing, then apply migrations."""
        pg = self.topo.postgres
        conn = await self._admin()
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", pg.user)
            # a role name and password cannot be bind parameters in DDL: quote them
            ident = await conn.fetchval("SELECT quote_ident($1)", pg.user)
            secret = await conn.fetchval("SELECT quote_literal($1)", pg.password.get_secret_value())
            verb = "ALTER" if exists else "CREATE"
            await conn.execute(f"{verb} ROLE {ident} LOGIN PASSWORD {secret}")
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", pg.database):
                db = await conn.fetchval("SELECT quote_ident($1)", pg.database)
                await conn.execute(f"CREATE DATABASE {db} OWNER {ident}")
        finally:
            await conn.close()
        app = await asyncpg.connect(pg.dsn(), timeout=5)
        try:
            return await migrate(app)
        finally:
            await app.close()
