"""Start pom-ha daemons of one POM server as lab processes (under that server's uid, by PID)."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

from pom_ha.config import REPO_ROOT, Topology
from pom_ha.infra.process import ProcessRecord, start_process


def start_daemon(
    topo: Topology,
    topology_file: Path,
    server: str,
    daemon: str,
    *args: str,
    name: str | None = None,
    as_server_uid: bool = True,
) -> ProcessRecord:
    """``python -m services.<daemon> --server <server> --topology <file> <args>``, detached.

    The record's name defaults to ``<daemon>-<server>-<short id>``; logs go to the lab's logs folder.
    """
    name = name or f"{daemon}-{server}-{uuid.uuid4().hex[:6]}"
    lab = topo.lab_dir()
    uid = topo.server_uid(server)
    argv = [
        sys.executable, "-m", f"services.{daemon.replace('-', '_')}",
        "--server", server, "--topology", str(topology_file), *args,
        f"--instance-tag={name}",
    ]
    # a private HOME the server's uid owns: drivers look there for client certificates (asyncpg
    # reads ~/.postgresql/), and root's home is not readable by the lab uids
    home = lab / server / "home"
    home.mkdir(parents=True, exist_ok=True)
    if as_server_uid:
        os.chown(home, uid, uid)
    return start_process(
        name,
        argv,
        run_dir=lab / "run",
        log_path=lab / "logs" / f"{name}.log",
        marker=f"--instance-tag={name}",
        env={"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", "HOME": str(home)},
        cwd=REPO_ROOT,
        user=(uid, uid) if as_server_uid else None,
    )
