"""``pom-ha lab up | status | down``: the whole local lab — real servers, every daemon, the demo campaign."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from pom_ha.cli_support import print_component_table, print_server_status, table, topology_option, topology_or_exit
from pom_ha.config import ConfigError, Topology, dump_topology
from pom_ha.infra.process import InfraError

_topology = topology_or_exit


def _topology_file(topo: Topology, path: str | None) -> Path:
    """The file the daemons read: the operator's own, or a copy of the default in the lab folder."""
    if path:
        return Path(path).resolve()
    lab = topo.lab_dir()
    lab.mkdir(parents=True, exist_ok=True)
    target = dump_topology(topo, lab / "topology.toml")
    target.chmod(0o644)
    return target


def _docker_lab(command: str) -> None:
    import os

    from pom_ha.config import REPO_ROOT

    script = REPO_ROOT / "scripts" / "docker-lab"
    os.execv(str(script), [str(script), command])


@click.group("lab")
def lab() -> None:
    """The local multi-server lab: servers, pom-ha daemons and a demo campaign."""


@lab.command("up")
@click.option("--demo/--no-demo", default=True, show_default=True,
              help="create and start the demo campaigns (agentless, and agent-based with 50 bot agents per zone)")
@click.option("--contacts", type=click.IntRange(1, 1_000_000), default=10_000, show_default=True)
@click.option("--calls-per-second", type=click.FloatRange(0.1, 2000), default=25.0, show_default=True)
@click.option("--containers", is_flag=True,
              help="the same lab as containers on a Docker engine (scripts/docker-lab up, docker-compose.yml)")
@topology_option
def lab_up(demo: bool, contacts: int, calls_per_second: float, containers: bool, topology_path: str | None) -> None:
    """Start the servers, then every daemon on every POM server, then the demo campaigns (agentless; predictive
    in two zones with a desktop simulator of 50 agents each); print the tables."""
    if containers:
        _docker_lab("up")
    from pom_ha.infra.stack import Stack
    from pom_ha.lab.platform import create_agent_demo, create_demo, start_desktops, start_platform, wait_platform
    from pom_ha.status import read_table

    topo = _topology(topology_path)
    if topology_path is None and not topo.web.tls_cert:
        from pom_ha.web.lab import web_certs

        topo = web_certs(topo)  # the lab's console over HTTPS, certificates from the lab CA
    stack = Stack(topo)

    async def go() -> None:
        from pom_ha.web.lab import ensure_demo_admin, password_file

        seconds = await stack.up(progress=lambda m: click.echo(f"  {m}"))
        click.echo(f"servers up in {seconds:.1f} s (lab folder {topo.lab_dir()})")
        start_platform(topo, _topology_file(topo, topology_path), echo=click.echo)
        await wait_platform(topo)
        click.echo("daemons up: every component registered on every server")
        password = await ensure_demo_admin(topo)
        scheme = "https" if topo.web.tls_cert else "http"
        url = f"{scheme}://{topo.servers[0].address}:{topo.ports.rest_api}/"
        if password:
            click.echo(f"console: {url} (every server) user admin, password {password} - shown once, kept in "
                       f"{password_file(topo)} (mode 0600)")
        else:
            click.echo(f"console: {url} (every server) user admin, password in {password_file(topo)}")
        from pom_ha.lab.monitoring import start_monitoring

        await start_monitoring(topo, _topology_file(topo, topology_path), echo=click.echo)
        if demo:
            click.echo(await create_demo(topo, contacts=contacts, calls_per_second=calls_per_second,
                                         echo=click.echo))
            jobs = await create_agent_demo(topo, echo=click.echo)
            start_desktops(topo, _topology_file(topo, topology_path), jobs, echo=click.echo)
        components = await read_table(topo.postgres.dsn(), [s.name for s in topo.servers])
        click.echo(table(components.header(), components.lines(stale_after_s=5.0)))

    try:
        asyncio.run(go())
    except (ConfigError, InfraError) as exc:
        click.echo(f"error: {exc}", err=True)
        click.echo("the lab is left as it is for inspection; stop it with: pom-ha lab down", err=True)
        sys.exit(2)
    click.echo("watch it with: pom-ha lab status   (stop it with: pom-ha lab down)")


@lab.command("status")
@topology_option
def lab_status(topology_path: str | None) -> None:
    """Server processes, the component table, and the jobs."""
    from pom_ha.infra.stack import Stack

    topo = _topology(topology_path)
    print_server_status(Stack(topo))
    click.echo("")
    print_component_table(topo, 5.0, False)
    click.echo("")
    asyncio.run(_print_jobs(topo))


async def _print_jobs(topo: Topology) -> None:
    import asyncpg

    try:
        conn = await asyncpg.connect(topo.postgres.dsn(), timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        click.echo(f"jobs: PostgreSQL unreachable ({exc.__class__.__name__})")
        return
    try:
        rows = await conn.fetch(
            "SELECT j.id, c.name, j.state, a.owner_server,"
            " (SELECT count(*) FROM attempts t WHERE t.job_id = j.id) AS attempts,"
            " (SELECT count(*) FROM job_contacts jc WHERE jc.job_id = j.id AND jc.state = 'done') AS done,"
            " (SELECT count(*) FROM job_contacts jc WHERE jc.job_id = j.id) AS contacts"
            " FROM jobs j JOIN campaigns c ON c.id = j.campaign_id"
            " LEFT JOIN ha_assignment a ON a.service = 'campaign_manager' AND a.item = 'job:' || j.id"
            " ORDER BY j.id"
        )
    finally:
        await conn.close()
    if not rows:
        click.echo("no jobs")
        return
    click.echo(table(
        ["JOB", "CAMPAIGN", "STATE", "CM", "ATTEMPTS", "CONTACTS DONE"],
        [[str(r["id"]), r["name"], r["state"], r["owner_server"] or "-", str(r["attempts"]),
          f"{r['done']}/{r['contacts']}"] for r in rows],
    ))


@lab.command("down")
@click.option("--containers", is_flag=True, help="the container lab (scripts/docker-lab down)")
@topology_option
def lab_down(containers: bool, topology_path: str | None) -> None:
    """Stop every daemon and server the lab started (by PID). A no-op when nothing runs."""
    if containers:
        _docker_lab("down")
    from pom_ha.infra.stack import Stack

    stopped = asyncio.run(Stack(_topology(topology_path)).down())
    click.echo(f"stopped {len(stopped)} process(es)" + (f": {', '.join(stopped)}" if stopped else ""))


# ---- the container lab's steps (docker-compose.yml runs them as one-shot / long-running services) -----------
@lab.command("demo")
@click.option("--contacts", type=click.IntRange(1, 1_000_000), default=10_000, show_default=True)
@click.option("--calls-per-second", type=click.FloatRange(0.1, 2000), default=25.0, show_default=True)
@click.option("--wait-s", type=click.FloatRange(1, 3600), default=300.0, show_default=True,
              help="how long to wait for the platform (every daemon registered on every server)")
@topology_option
def lab_demo(contacts: int, calls_per_second: float, wait_s: float, topology_path: str | None) -> None:
    """Wait for the platform, then create and start the demo campaigns unless they exist (what `lab up`
    does after starting the daemons; the container lab's `demo` service)."""
    from pom_ha.lab.platform import create_agent_demo, create_demo, wait_platform

    topo = _topology(topology_path)

    async def go() -> None:
        import time

        import asyncpg

        deadline = time.monotonic() + wait_s
        while True:
            # a database that is slow or restarting breaks a connection mid-query: wait on a new one
            try:
                await wait_platform(topo, timeout_s=max(1.0, deadline - time.monotonic()))
                break
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    asyncpg.exceptions._base.InternalClientError) as exc:
                if time.monotonic() > deadline:
                    raise InfraError(f"platform not up within {wait_s:.0f} s: {exc}") from exc
                click.echo(f"  waiting for the platform: {exc.__class__.__name__}: {exc}")
                await asyncio.sleep(2)
        click.echo("daemons up: every component registered on every server")
        click.echo(await create_demo(topo, contacts=contacts, calls_per_second=calls_per_second, echo=click.echo))
        jobs = await create_agent_demo(topo, echo=click.echo)
        click.echo("agent jobs: " + ", ".join(f"{zone} {job}" for zone, job in sorted(jobs.items())))

    try:
        asyncio.run(go())
    except (ConfigError, InfraError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


@lab.command("desktop")
@click.option("--zone", required=True, help="a zone with an agent-based demo campaign")
@click.option("--server", required=True, help="the POM server whose Agent Manager the desktops try first")
@click.option("--agents", type=click.IntRange(1, 5000), default=50, show_default=True)
@topology_option
def lab_desktop(zone: str, server: str, agents: int, topology_path: str | None) -> None:
    """Run the desktop simulator of ``zone`` on its demo job (created by `lab demo`) in the foreground."""
    import os

    from pom_ha.lab.platform import agent_zones, create_agent_demo

    topo = _topology(topology_path)
    if zone not in agent_zones(topo):
        click.echo(f"error: zone {zone!r} has no agent-based demo campaign (zones: {', '.join(agent_zones(topo))})",
                   err=True)
        sys.exit(1)
    if server not in [s.name for s in topo.servers]:
        click.echo(f"error: unknown server {server!r}", err=True)
        sys.exit(1)
    try:
        jobs = asyncio.run(create_agent_demo(topo, echo=click.echo))
    except (ConfigError, InfraError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    argv = [sys.executable, "-m", "services.desktop_simulator", "--server", server, "--zone", zone,
            "--agents", str(agents), "--job", str(jobs[zone]), "--agent-prefix", f"sim-{zone}-"]
    if topology_path:
        argv += ["--topology", topology_path]
    os.execv(sys.executable, argv)
