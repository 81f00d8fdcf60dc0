"""The container lab (docker-compose.yml) seen from the host: its containers by POM server and service, and
the faults a chaos test or a benchmark injects into them with the docker CLI (kill, pause, network
disconnect) and heals (start, unpause, connect again at the server's address).

The compose project is ``POM_COMPOSE_PROJECT`` (default ``pomha``, as scripts/docker-lab); PostgreSQL is
reached on its published port 127.0.0.1:15432, so nothing here needs a route into the containers' network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pom_ha.config import REPO_ROOT, Topology, load_topology

COMPOSE_TOPOLOGY = REPO_ROOT / "config" / "compose.toml"
PUBLISHED_PG = ("127.0.0.1", 15432)
# compose service of each HA service's daemon on a server: <server>-<daemon>
HA_DAEMONS = {"cache_service": "cache-service", "rule_engine": "rule-engine",
              "campaign_director": "campaign-director", "campaign_manager": "campaign-manager",
              "agent_manager": "agent-manager", "event_aggregator": "event-aggregator"}


class DockerError(RuntimeError):
    """A docker command failed; the message names the command and its output."""


def docker_available() -> str | None:
    """None when a Docker engine answers, else why not (for a skip or an error message)."""
    if shutil.which("docker") is None:
        return "no docker CLI installed (scripts/docker-engine ensure installs docker.io)"
    try:
        out = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                             text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer `docker info` within 30 s"
    if out.returncode != 0:
        return f"no Docker engine is running ({(out.stderr or out.stdout).strip()[:200]})"
    return None


def docker(*args: str, timeout_s: float = 60.0, check: bool = True) -> str:
    try:
        out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise DockerError(f"docker {' '.join(args)}: no answer within {timeout_s:.0f} s") from exc
    if check and out.returncode != 0:
        raise DockerError(f"docker {' '.join(args)}: {(out.stderr or out.stdout).strip()[:500]}")
    return out.stdout


@dataclass(frozen=True)
class Container:
    id: str
    name: str
    service: str
    state: str  # running, exited, paused, restarting, created


class ComposeLab:
    """The containers of one compose project of docker-compose.yml."""

    def __init__(self, project: str | None = None, topology: Path = COMPOSE_TOPOLOGY) -> None:
        self.project = project or os.environ.get("POM_COMPOSE_PROJECT", "pomha")
        self.topo: Topology = load_topology(topology).model_copy(
            update={"postgres": load_topology(topology).postgres.model_copy(
                update={"address": PUBLISHED_PG[0], "port": PUBLISHED_PG[1]})})
        self.network = f"{self.project}_pomnet"

    @property
    def dsn(self) -> str:
        """PostgreSQL of the lab through its loopback-published port."""
        pg = self.topo.postgres
        password = os.environ.get("POM_PG_PASSWORD", pg.password.get_secret_value())
        return f"postgresql://{pg.user}:{password}@{pg.address}:{pg.port}/{pg.database}?sslmode=disable"

    @property
    def servers(self) -> list[str]:
        return [s.name for s in self.topo.servers]

    def containers(self) -> list[Container]:
        out = docker("ps", "-a", "--filter", f"label=com.docker.compose.project={self.project}", "--format",
                     '{{.ID}}\t{{.Names}}\t{{.Label "com.docker.compose.service"}}\t{{.State}}')
        rows = [line.split("\t") for line in out.splitlines() if line.strip()]
        return [Container(*row) for row in rows if len(row) == 4]

    def container(self, service: str) -> Container:
        found = [c for c in self.containers() if c.service == service]
        if not found:
            raise DockerError(f"no container of service {service!r} in project {self.project}")
        return found[0]

    def server_services(self, server: str) -> list[str]:
        """Every compose service of one POM server: the namespace holder and all that joins it."""
        return sorted({c.service for c in self.containers()
                       if c.service == server or c.service.startswith(f"{server}-")})

    def daemon_service(self, ha_service: str, server: str) -> str:
        return f"{server}-{HA_DAEMONS[ha_service]}"

    def running(self) -> bool:
        return any(c.state == "running" for c in self.containers())

    # ---- faults and heals ------------------------------------------------------------------------------
    def kill(self, *services: str) -> None:
        """SIGKILL; the restart policy (unless-stopped) starts them again."""
        ids = [self.container(s).id for s in services]
        docker("kill", *ids, check=False)  # one already dead is not an error

    def start(self, *services: str) -> None:
        for s in services:
            c = self.container(s)
            if c.state != "running":
                docker("start", c.id, check=False)

    def pause(self, service: str) -> None:
        docker("pause", self.container(service).id)

    def unpause(self, service: str) -> None:
        c = self.container(service)
        if c.state == "paused":
            docker("unpause", c.id)

    def disconnect(self, server: str) -> None:
        """Cut one POM server from the lab network (every container of it shares that interface)."""
        docker("network", "disconnect", "--force", self.network, self.container(server).id)

    def connect(self, server: str) -> None:
        """Join the server to the lab network again, at its own address."""
        c = self.container(server)
        attached = docker("inspect", "-f", "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}", c.id)
        if self.network not in attached.split():
            docker("network", "connect", "--ip", self.topo.server(server).address, self.network, c.id)

    def heal(self) -> None:
        """Undo every fault: unpause, reconnect, start what is not running (namespace holders first)."""
        for c in self.containers():
            if c.state == "paused":
                docker("unpause", c.id, check=False)
        for server in self.servers:
            self.connect(server)
        cs = self.containers()
        order = sorted(cs, key=lambda c: (c.service not in self.servers, c.service))
        for c in order:
            if c.state in ("exited", "created") and c.service not in ("image", "migrate", "demo", "cli"):
                docker("start", c.id, check=False)
