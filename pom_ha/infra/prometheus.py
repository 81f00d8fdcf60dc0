"""Prometheus for a pom-ha cluster: the scrape targets of a topology and the lab's Prometheus server.

The scrape config and the alerting rules are files of the repository (``deploy/prometheus/prometheus.yml``,
``rules.yml``), the same for the process lab, docker compose and the VMs; only the targets differ. They are
generated from the topology as Prometheus ``file_sd`` JSON (:func:`scrape_targets`): on every POM server its
``infra`` exporter (``infra serve`` on a VM, ``infra observe`` in the lab) and each HA daemon it runs, at the
fixed ports ``ports.metrics_*``, labelled ``server`` and ``daemon``.

:class:`PrometheusLauncher` runs Debian's ``prometheus`` for the process lab on the PostgreSQL host's address
(the lab's "database and monitoring host") at ``ports.prometheus``, with its config folder and TSDB under
``<lab>/prometheus``.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
from pathlib import Path
from typing import Any, ClassVar

import aiohttp

from pom_ha.config import REPO_ROOT, ServerSection, Topology
from pom_ha.infra.base import Launcher
from pom_ha.infra.process import InfraError

DEPLOY_DIR = REPO_ROOT / "deploy" / "prometheus"
#: the HA daemons (they serve /metrics), in the lab's start order
METRICS_DAEMONS = ("cache-service", "rule-engine", "campaign-director", "campaign-manager", "agent-manager",
                   "event-aggregator")


def server_daemons(topo: Topology, server: str) -> list[str]:
    """The HA daemons ``server`` runs: the cache service only beside an Ignite node, the Enriched Attempt
    Aggregator only when the topology has Kafka."""
    runs = topo.server(server).runs
    return [d for d in METRICS_DAEMONS
            if not (d == "cache-service" and "ignite" not in runs)
            and not (d == "event-aggregator" and not topo.servers_running("kafka"))]


def scrape_targets(topo: Topology, daemons: dict[str, list[str]] | None = None,
                   infra: bool = True) -> list[dict[str, Any]]:
    """``file_sd`` target groups: one per (server, daemon). ``daemons`` narrows the daemons per server
    (default :func:`server_daemons`); ``infra`` adds each server's infra exporter."""
    groups: list[dict[str, Any]] = []
    for s in topo.servers:
        names = daemons.get(s.name, []) if daemons is not None else server_daemons(topo, s.name)
        for daemon in (["infra"] if infra else []) + names:
            port = topo.ports.metrics(daemon)
            if port is None:
                raise InfraError(f"{daemon!r} has no metrics port in the topology (ports.metrics_*)")
            groups.append({"targets": [f"{s.address}:{port}"], "labels": {"server": s.name, "daemon": daemon}})
    return groups


def write_config(dest: Path, targets: list[dict[str, Any]]) -> Path:
    """deploy/prometheus's config and rules into ``dest``, the targets into ``dest/targets/pom-ha.json``;
    returns the config file."""
    (dest / "targets").mkdir(parents=True, exist_ok=True)
    for name in ("prometheus.yml", "rules.yml"):
        shutil.copyfile(DEPLOY_DIR / name, dest / name)
    tmp = dest / "targets" / ".pom-ha.json.tmp"
    tmp.write_text(json.dumps(targets, indent=1) + "\n")
    tmp.replace(dest / "targets" / "pom-ha.json")  # file_sd reads whole files only
    return dest / "prometheus.yml"


def prometheus_bin() -> str:
    found = shutil.which("prometheus")
    if not found:
        raise InfraError("prometheus not found: run scripts/install (Debian package prometheus)")
    return found


class PrometheusLauncher(Launcher):
    """The process lab's Prometheus, scraping :func:`scrape_targets` of the topology."""

    kind = "prometheus"
    runs_as_server_uid = False
    start_timeout_s: ClassVar[float] = 60.0

    def __init__(self, topo: Topology, targets: list[dict[str, Any]] | None = None) -> None:
        super().__init__(topo, ServerSection(name="monitor", address=topo.postgres.address))
        self.targets = scrape_targets(topo) if targets is None else targets

    @property
    def name(self) -> str:
        return "prometheus"

    @property
    def home(self) -> Path:
        return self.lab_dir / "prometheus"

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.topo.ports.prometheus}"

    @property
    def user(self) -> tuple[int, int] | None:
        # Debian's package creates the `prometheus` user; as root the lab drops to it
        if os.geteuid() != 0:
            return None
        try:
            pw = pwd.getpwnam("prometheus")
        except KeyError:
            return None
        return (pw.pw_uid, pw.pw_gid)

    def listen_ports(self) -> list[tuple[str, int]]:
        return [(self.address, self.topo.ports.prometheus)]

    def prepare(self) -> None:
        write_config(self.home / "conf", self.targets)
        (self.home / "data").mkdir(parents=True, exist_ok=True)

    def argv(self) -> list[str]:
        return [
            prometheus_bin(), f"--config.file={self.home / 'conf' / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.home / 'data'}", "--storage.tsdb.retention.time=2d",
            f"--web.listen-address={self.address}:{self.topo.ports.prometheus}",
        ]

    async def probe(self) -> bool:
        return await self.api("/-/ready", raw=True) is not None

    async def api(self, path: str, *, raw: bool = False) -> Any:
        """GET ``path`` of the HTTP API: the JSON answer's ``data`` (or the body when ``raw``); None when
        Prometheus does not answer or answers with an error."""
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as http, \
                    http.get(self.url + path) as resp:
                if resp.status != 200:
                    return None
                if raw:
                    return await resp.read()
                doc = await resp.json()
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return None
        return doc.get("data") if doc.get("status") == "success" else None
