"""A private copy of a topology for self-contained benchmarks: its own lab folder and addresses.

Benchmarks must not disturb a lab that is running, so the copy moves every server to another
127.x.y.N block and PostgreSQL to its own address, keeping ports.
"""

from __future__ import annotations

import os
import tempfile

from pom_ha.config import Topology


def isolated_topology(topo: Topology, block: int = 10, lab_dir: str | None = None) -> Topology:
    """The same topology on 127.0.<block>.N (servers) and 127.0.<block+1>.1 (PostgreSQL)."""
    if lab_dir is None:
        lab_dir = tempfile.mkdtemp(prefix="pomha-lab-")
        # the servers run under their own uids and must reach their folders below this one
        os.chmod(lab_dir, 0o755)
    servers = [
        s.model_copy(update={"address": f"127.0.{block}.{i}"}) for i, s in enumerate(topo.servers, start=1)
    ]
    return topo.model_copy(
        update={
            "servers": servers,
            "postgres": topo.postgres.model_copy(update={"address": f"127.0.{block + 1}.1"}),
            # uids move with the block, so owner-based partitions of two sessions never cut each other
            "lab": topo.lab.model_copy(update={"dir": lab_dir, "uid_base": topo.lab.uid_base + 100 * block}),
            "source": f"{topo.source} (isolated copy in {lab_dir})",
        }
    )
