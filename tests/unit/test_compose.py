"""docker-compose.yml, checked statically (no Docker engine here): it must describe the same lab as the
process lab — the same POM servers at the addresses of config/compose.toml, every platform daemon on every
server, commands pom-ha knows, only loopback-published ports, and a Dockerfile whose sources exist."""

from __future__ import annotations

import importlib.util
from typing import Any

import click
import pytest
import yaml

from pom_ha.cli import main
from pom_ha.config import REPO_ROOT, load_topology
from pom_ha.lab.platform import PLATFORM_DAEMONS, agent_zones, daemon_args

COMPOSE = REPO_ROOT / "docker-compose.yml"
TOPOLOGY = REPO_ROOT / "config" / "compose.toml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def test_the_compose_topology_loads_and_matches_the_network(compose: dict[str, Any]) -> None:
    topo = load_topology(TOPOLOGY)
    services = compose["services"]
    assert services["postgres"]["networks"]["pomnet"]["ipv4_address"] == topo.postgres.address
    for server in topo.servers:
        assert services[server.name]["networks"]["pomnet"]["ipv4_address"] == server.address, server.name
    subnet = compose["networks"]["pomnet"]["ipam"]["config"][0]["subnet"]
    assert subnet == "172.28.0.0/24"


def test_every_pom_server_runs_its_servers_and_every_platform_daemon(compose: dict[str, Any]) -> None:
    topo = load_topology(TOPOLOGY)
    services = compose["services"]
    for server in topo.servers:
        infra = services[f"{server.name}-infra"]
        assert infra["command"] == ["infra", "serve", "--server", server.name, "--without", "ignite"]
        assert infra["network_mode"] == f"service:{server.name}"
        assert infra["pid"] == f"service:{server.name}", "pid files must be valid across the server's containers"
        for daemon in PLATFORM_DAEMONS:
            svc = services[f"{server.name}-{daemon}"]
            command = svc["command"]
            assert command[:4] == ["run", daemon, "--server", server.name], command
            assert command[4:4 + len(daemon_args(topo, daemon))] == daemon_args(topo, daemon), \
                f"{daemon}: the process lab's arguments"
            assert svc["network_mode"] == f"service:{server.name}", "a daemon binds its POM server's address"
            assert svc["pid"] == f"service:{server.name}"


def test_commands_daemons_and_references_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        mode = svc.get("network_mode", "")
        if mode and mode != "none":
            assert mode.startswith("service:") and mode.removeprefix("service:") in services, (name, mode)
        if svc.get("image") != "pom-ha:local" or "entrypoint" in svc:
            continue
        command = svc["command"]
        assert command[0] in main.commands or command == ["--help"], f"{name}: unknown pom-ha command {command}"
        if command[0] == "run":
            module = "services." + command[1].replace("-", "_")
            assert importlib.util.find_spec(module) is not None, f"{name}: no daemon {module}"
        group = main.commands.get(command[0])
        if isinstance(group, click.Group):
            assert command[1] in group.commands, f"{name}: unknown command pom-ha {command[0]} {command[1]}"


def test_published_ports_are_loopback_only_and_secrets_come_from_the_environment(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    text = COMPOSE.read_text()
    assert "${POM_PG_PASSWORD:-" in text, "the database password is taken from the environment"


def test_the_dockerfile_copies_what_exists() -> None:
    dockerfile = REPO_ROOT / "deploy" / "docker" / "Dockerfile"
    copies = [line.split()[1:-1] for line in dockerfile.read_text().splitlines() if line.startswith("COPY ")]
    assert copies
    for sources in copies:
        for src in sources:
            assert (REPO_ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    assert "scripts/install" in dockerfile.read_text(), "the image installs exactly as a VM does"


def test_every_server_and_daemon_has_a_health_check_and_a_grace_period(compose: dict[str, Any]) -> None:
    topo = load_topology(TOPOLOGY)
    services = compose["services"]
    assert "healthcheck" in services["postgres"]
    for server in topo.servers:
        for name in [f"{server.name}-infra", *(f"{server.name}-{d}" for d in PLATFORM_DAEMONS)]:
            svc = services[name]
            test = svc["healthcheck"]["test"]
            assert test[0] == "CMD" and test[1] == "/opt/pom-ha/deploy/docker/healthcheck", (name, test)
            assert (REPO_ROOT / "deploy" / "docker" / "healthcheck").exists()
            assert svc["stop_signal"] == "SIGTERM" and svc["stop_grace_period"], name
        # daemons start once their server's servers are ready, not merely started
        for daemon in PLATFORM_DAEMONS:
            if daemon != "cache-service":
                dep = services[f"{server.name}-{daemon}"]["depends_on"][f"{server.name}-infra"]
                assert dep["condition"] == "service_healthy", daemon


def test_postgres_takes_the_labs_connections_and_reaps_orphans(compose: dict[str, Any]) -> None:
    pg = compose["services"]["postgres"]
    command = pg["command"]
    limit = int(next(a.split("=", 1)[1] for a in command if a.startswith("max_connections=")))
    # 8 daemons x 3 servers with pools of up to 4-10, infra, status reads: the stock 100 is not enough
    assert limit >= 300, limit
    assert pg["init"] is True, "postgres as PID 1 takes a reparented health-check process for a crashed backend"
    assert pg["image"].startswith("${POM_POSTGRES_IMAGE:-postgres:15}")


def test_the_demo_and_a_desktop_simulator_per_agent_zone(compose: dict[str, Any]) -> None:
    topo = load_topology(TOPOLOGY)
    services = compose["services"]
    assert services["demo"]["command"] == ["lab", "demo"]
    needs = services["demo"]["depends_on"]
    assert all(needs[f"{s.name}-{d}"]["condition"] == "service_healthy" for s in topo.servers for d in PLATFORM_DAEMONS)
    for zone in agent_zones(topo):
        desk = services[f"desktop-{zone.lower()}"]
        assert desk["command"][:4] == ["lab", "desktop", "--zone", zone]
        assert desk["depends_on"]["demo"]["condition"] == "service_completed_successfully"
