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
from pom_ha.lab.platform import PLATFORM_DAEMONS

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
            assert svc["command"] == ["run", daemon, "--server", server.name]
            assert svc["network_mode"] == f"service:{server.name}", "a daemon binds its POM server's address"
            assert svc["pid"] == f"service:{server.name}"


def test_commands_daemons_and_references_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        mode = svc.get("network_mode", "")
        if mode:
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
