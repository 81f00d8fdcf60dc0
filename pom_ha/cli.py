"""`pom-ha`: the operator's command line. A thin layer over the library; each group owns one area."""

from __future__ import annotations

import json
import os
import sys
from typing import TypeVar

import click

from pom_ha.campaign.admin_cli import COMMANDS as CAMPAIGN_COMMANDS
from pom_ha.chaos.cli import chaos_group
from pom_ha.cli_support import (
    print_component_table,
    print_server_status,
    run_or_exit,
    table,
    topology_option,
    topology_or_exit,
)
from pom_ha.infra.process import InfraError
from pom_ha.infra.prometheus_cli import prometheus_group
from pom_ha.kafka.cli import kafka_group
from pom_ha.lab.cli import lab as lab_group
from pom_ha.web.cli import token_group, user_group
from pom_ha.zones.cli import zone_group
from pom_ha.zones.sdk_link import agents_group

T = TypeVar("T")

_run = run_or_exit
_topology = topology_or_exit


@click.group()
def main() -> None:
    """pom-ha: highly available control plane for proactive outbound contact centers."""


# ---- infra -------------------------------------------------------------------------------------------
@main.group()
def infra() -> None:
    """The lab's real servers: PostgreSQL, ZooKeeper, Kafka, Ignite, ActiveMQ."""


@infra.command("up")
@topology_option
def infra_up(topology_path: str | None) -> None:
    """Start every server of the topology and wait until each is ready on its protocol."""
    from pom_ha.infra.stack import Stack

    stack = Stack(_topology(topology_path))
    seconds = _run(stack.up(progress=lambda m: click.echo(f"  {m}")))
    click.echo(f"infrastructure up in {seconds:.1f} s (lab folder {stack.topo.lab_dir()})")
    print_server_status(stack)


@infra.command("down")
@topology_option
def infra_down(topology_path: str | None) -> None:
    """Stop every process the lab started (by PID). A no-op when nothing runs."""
    from pom_ha.infra.stack import Stack

    stopped = _run(Stack(_topology(topology_path)).down())
    click.echo(f"stopped {len(stopped)} process(es)" + (f": {', '.join(stopped)}" if stopped else ""))


@infra.command("status")
@topology_option
def infra_status(topology_path: str | None) -> None:
    """One row per server process: POM server, kind, address:port, pid, state."""
    from pom_ha.infra.stack import Stack

    print_server_status(Stack(_topology(topology_path)))


@infra.command("serve")
@click.option("--server", required=True, help="POM server name from the topology (pom1)")
@click.option("--without", multiple=True, metavar="KIND",
              help="leave this kind to another supervisor (e.g. ignite, when a cache service runs it)")
@click.option("--ready-timeout", "ready_timeout_s", type=click.FloatRange(10, 3600), default=600.0, show_default=True)
@topology_option
def infra_serve(server: str, without: tuple[str, ...], ready_timeout_s: float, topology_path: str | None) -> None:
    """Run ONE POM server's share of the real servers in the foreground (one host or container per POM
    server): start, wait for, supervise (restart what dies) and, on SIGTERM, stop them."""
    from pom_ha.infra.serve import serve

    restarted = _run(serve(_topology(topology_path), server, without=without, ready_timeout_s=ready_timeout_s,
                           echo=click.echo))
    click.echo(f"{server}: stopped" + (f" (restarted while serving: {', '.join(restarted)})" if restarted else ""))


@infra.command("observe")
@click.option("--server", required=True, help="POM server name from the topology (pom1)")
@topology_option
def infra_observe(server: str, topology_path: str | None) -> None:
    """Serve /metrics of ONE POM server's share of the real servers (up, Kafka under-replicated partitions)
    on ports.metrics_infra without starting or restarting anything, until SIGTERM (the process lab's exporter;
    `infra serve` exports the same itself)."""
    import asyncio
    import signal

    from pom_ha.infra.serve import server_launchers
    from pom_ha.infra.serve_metrics import observe

    topo = topology_or_exit(topology_path)

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await observe(topo, server, server_launchers(topo, server), stop=stop)

    run_or_exit(go())


# ---- db ----------------------------------------------------------------------------------------------
@main.group()
def db() -> None:
    """The PostgreSQL schema."""


@db.command("migrate")
@topology_option
def db_migrate(topology_path: str | None) -> None:
    """Apply pending numbered migrations (idempotent)."""
    import asyncpg

    from pom_ha.db.migrate import migrate

    topo = _topology(topology_path)

    async def go() -> list[int]:
        try:
            conn = await asyncpg.connect(topo.postgres.dsn(), timeout=5)
        except (OSError, asyncpg.PostgresError) as exc:
            raise InfraError(
                f"cannot reach PostgreSQL at {topo.postgres.address}:{topo.postgres.port}: {exc.__class__.__name__}"
            ) from None
        try:
            return await migrate(conn)
        finally:
            await conn.close()

    applied = _run(go())
    click.echo(f"applied migrations {applied}" if applied else "schema up to date")


# ---- status ------------------------------------------------------------------------------------------
@main.command("status")
@click.option("--stale-after", "stale_after_s", type=click.FloatRange(0.5, 3600), default=5.0, show_default=True,
              help="seconds without a refresh after which a member is shown as UNREACHABLE")
@click.option("--json", "as_json", is_flag=True)
@topology_option
def status(stale_after_s: float, as_json: bool, topology_path: str | None) -> None:
    """The component table: one row per component, one column per server (MASTER (zones) / DORMANT /
    RUNNING / STOPPED), read from the ha_member status rows."""
    print_component_table(_topology(topology_path), stale_after_s, as_json)


# ---- run ---------------------------------------------------------------------------------------------
@main.command("run", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("daemon")
@click.pass_context
def run(ctx: click.Context, daemon: str) -> None:
    """Run one daemon in the foreground: `pom-ha run ha-probe --server pom1 --role NAME`."""
    import importlib.util

    module = "services." + daemon.replace("-", "_")
    if importlib.util.find_spec(module) is None:
        click.echo(f"error: unknown daemon {daemon!r}", err=True)
        sys.exit(2)
    os.execv(sys.executable, [sys.executable, "-m", module, *ctx.args])


# ---- bench -------------------------------------------------------------------------------------------
@main.group()
def bench() -> None:
    """Self-contained benchmarks; `--json` prints one JSON object on the last line."""


@bench.command("infra-up")
@click.option("--json", "as_json", is_flag=True)
@topology_option
def bench_infra_up(as_json: bool, topology_path: str | None) -> None:
    """Time from nothing to every server ready, and peak RSS per server kind."""
    from pom_ha.bench.infra_up import run_bench

    result = _run(run_bench(_topology(topology_path), echo=click.echo))
    click.echo(json.dumps(result) if as_json else table(
        ["KIND", "PEAK RSS MB"], [[k, f"{v:.0f}"] for k, v in result["rss_mb"].items()]
    ) + f"\nready in {result['seconds']:.1f} s, total peak RSS {result['total_rss_mb']:.0f} MB")


@bench.command("server-loss")
@click.option("--containers", is_flag=True,
              help="on the container lab (docker-compose.yml; the running one, or brought up and down)")
@click.option("--trials", type=click.IntRange(1, 200), default=20, show_default=True)
@click.option("--block", type=click.IntRange(3, 250), default=30, show_default=True,
              help="process lab: its servers on 127.0.<block>.N, PostgreSQL on 127.0.<block+1>.1")
@click.option("--json", "as_json", is_flag=True)
def bench_server_loss(containers: bool, trials: int, block: int, as_json: bool) -> None:
    """Kill every process (or container) of one POM server while the demo campaigns dial, rotating the
    victim: roles back elsewhere, longest gap between attempts per job, duplicates, stuck (database clock)."""
    from pom_ha.bench.server_loss import run_bench

    try:
        r = _run(run_bench(containers=containers, trials=trials, block=block, echo=click.echo))
    except (RuntimeError, TimeoutError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(json.dumps(r) if as_json else (
        f"server loss on the {r['lab']} lab, {r['trials']} trials: roles back p50 {r['roles_back_p50_ms']} ms,"
        f" p99 {r['roles_back_p99_ms']} ms; longest dial gap p50 {r['dial_gap_p50_ms']} ms,"
        f" p99 {r['dial_gap_p99_ms']} ms; duplicates {r['duplicates']}; stuck {r['stuck']}"))


@bench.command("failover")
@click.option("--mode", type=click.Choice(["kill", "stop", "graceful", "partition"]), default="kill")
@click.option("--component", type=click.Choice(["probe", "cd", "cm", "re", "am"]), default="probe",
              show_default=True,
              help="probe: the HA core alone (ha-probe daemons); cd/cm/re: that component in a dialing platform; "
                   "am: the Agent Manager with --agents desktops (kill only)")
@click.option("--trials", type=click.IntRange(1, 200), default=None, help="default 20 (am: 5)")
@click.option("--agents", type=click.IntRange(1, 20_000), default=1000, show_default=True,
              help="am: logged-in desktops (30 % of them on a call)")
@click.option("--json", "as_json", is_flag=True)
@topology_option
def bench_failover(mode: str, component: str, trials: int | None, agents: int, as_json: bool,
                   topology_path: str | None) -> None:
    """Fault of the master -> the new master's first fenced write (probe), or -> dialing again (cm, re), the
    new Common CD's first fenced action (cd), or the zone available with every desktop back (am)."""
    if component != "probe" and mode != "kill":
        click.echo(f"error: --component {component} supports --mode kill only", err=True)
        sys.exit(2)
    if component == "am":
        from pom_ha.bench.agents import run_am_failover

        a = _run(run_am_failover(_topology(topology_path), agents=agents, trials=trials or 5, echo=click.echo))
        click.echo(json.dumps(a) if as_json else (
            f"am kill, {a['agents']} agents ({a['on_call']} on a call), {a['trials']} trials: kill -> zone available"
            f" and every desktop back p50 {a['p50_ms']} ms, p99 {a['p99_ms']} ms (target {a['target_p99_ms']:.0f}"
            f" ms); detection p99 {a['detection']['p99_ms']} ms, init p99 {a['init']['p99_ms']} ms; vs POM's "
            f"{a['pom_detection_s']:.0f} s + initialisation: {a['pom_ratio_p99']}x faster (p99)\n"
            f"PostgreSQL CPU: {a['pg_cpu_failover_pct']} % of a core during failover vs {a['pg_cpu_quiet_pct']} %"
            f" quiet: +{a['pg_cpu_increase_pct']} points (POM: +{a['pom_pg_cpu_increase']})"))
        return
    trials = trials or 20
    if component != "probe":
        from pom_ha.bench.campaigns import run_component_failover

        c = _run(run_component_failover(_topology(topology_path), component, trials,  # type: ignore[arg-type]
                                        echo=click.echo))
        click.echo(json.dumps(c) if as_json else (
            f"{component} kill, {c['trials']} trials: p50 {c['p50_ms']} ms, p95 {c['p95_ms']} ms, "
            f"p99 {c['p99_ms']} ms, max {c['max_ms']} ms; duplicate attempts {c['duplicate_attempts']}; "
            f"vs POM's {c['pom_s']:.0f} s: {c['pom_ratio_p99']}x faster (p99)"))
        return
    from pom_ha.bench.failover import run_bench as run_failover

    r = _run(run_failover(_topology(topology_path), mode, trials, echo=click.echo))  # type: ignore[arg-type]
    if as_json:
        click.echo(json.dumps(r))
        return
    click.echo(
        f"mode {r['mode']}, {r['trials']} trials: p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, "
        f"p99 {r['p99_ms']} ms, max {r['max_ms']} ms, overlapping masters {r['overlaps']}"
    )
    click.echo("vs POM (p99): " + ", ".join(f"{k} {v}x faster" for k, v in r["pom_ratio_p99"].items()))


@bench.command("throughput")
@click.option("--seconds", type=click.FloatRange(5, 3600), default=60.0, show_default=True, help="measured window")
@click.option("--warmup", "warmup_s", type=click.FloatRange(0, 600), default=10.0, show_default=True)
@click.option("--calls-per-second", type=click.FloatRange(1, 5000), default=250.0, show_default=True,
              help="pacing of each job (one job per server)")
@click.option("--json", "as_json", is_flag=True)
@topology_option
def bench_throughput(seconds: float, warmup_s: float, calls_per_second: float, as_json: bool,
                     topology_path: str | None) -> None:
    """Agentless attempts per hour: every daemon on every server, media simulator, one job per server."""
    from pom_ha.bench.campaigns import run_throughput

    r = _run(run_throughput(_topology(topology_path), seconds=seconds, warmup_s=warmup_s,
                            calls_per_second=calls_per_second, echo=click.echo))
    click.echo(json.dumps(r) if as_json else (
        f"{r['attempts_per_hour']:,} attempts/hour ({r['attempts']} in {r['seconds']} s, {r['jobs']} jobs on "
        f"{r['campaign_managers']} CMs, duplicates {r['duplicate_attempts']}); {r['pom_ratio']}x POM's 500,000/h"))


@bench.command("import")
@click.option("--records", type=click.IntRange(1000, 10_000_000), default=200_000, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@topology_option
def bench_import(records: int, as_json: bool, topology_path: str | None) -> None:
    """CSV records imported per hour by the real Common CD (queued like an operator's import)."""
    from pom_ha.bench.campaigns import run_import

    r = _run(run_import(_topology(topology_path), records=records, echo=click.echo))
    click.echo(json.dumps(r) if as_json else (
        f"{r['records_per_hour']:,} records/hour ({r['imported']} imported, {r['rejected']} rejected in "
        f"{r['seconds']} s); {r['pom_ratio']}x POM's 500,000/h"))


@bench.command("rules")
@click.option("--dnc", "dnc", type=click.IntRange(1000, 20_000_000), default=1_000_000, show_default=True,
              help="numbers in the global DNC list")
@click.option("--checks", type=click.IntRange(1000, 10_000_000), default=200_000, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@topology_option
def bench_rules(dnc: int, checks: int, as_json: bool, topology_path: str | None) -> None:
    """Rule checks per second on one core with a large DNC list and contact strategies (POM_BENCH_BLOCK)."""
    from pom_ha.bench.rules import run_rules

    r = _run(run_rules(_topology(topology_path), dnc=dnc, checks=checks, echo=click.echo))
    click.echo(json.dumps(r) if as_json else (
        f"{r['checks_per_second']:,} checks/s on one core with {r['dnc_numbers']:,} DNC numbers "
        f"(rules loaded in {r['load_seconds']} s); verdicts {r['verdicts']}"))


@bench.command("pacing")
@click.option("--agents", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--seconds", type=click.FloatRange(60, 7 * 24 * 3600), default=8 * 3600.0, show_default=True,
              help="simulated seconds of the working day (not wall time)")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--abandon-cap", type=click.FloatRange(0.001, 0.5), default=0.03, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_pacing(agents: int, seconds: float, seed: int, abandon_cap: float, as_json: bool) -> None:
    """Predictive pacing: agent occupancy and abandon rate, the real pacer in a seeded call model."""
    from pom_ha.bench.pacing import run_bench as run_pacing

    r = run_pacing(agents, seconds, seed=seed, abandon_cap=abandon_cap)
    click.echo(json.dumps(r) if as_json else (
        f"{agents} agents, predictive: occupancy {r['occupancy']:.1%}, abandon rate {r['abandon_rate']:.2%} "
        f"(cap {abandon_cap:.0%}), {r['calls']} calls, {r['answers']} live answers; progressive occupancy "
        f"{r['progressive']['occupancy']:.1%} ({r['model']})"))  # type: ignore[index]


@bench.command("activemq-failover")
@click.option("--trials", type=click.IntRange(1, 200), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@topology_option
def bench_activemq_failover(trials: int, as_json: bool, topology_path: str | None) -> None:
    """SIGKILL of the ActiveMQ master -> the first receipted STOMP send on the new master (postgres +
    the two brokers on an isolated copy of the topology)."""
    from pom_ha.bench.activemq import run_bench

    r = _run(run_bench(_topology(topology_path), trials, echo=click.echo))
    click.echo(json.dumps(r) if as_json else (
        f"ActiveMQ master SIGKILL -> first confirmed send, {r['trials']} trials: p50 {r['p50_ms']} ms, "
        f"p95 {r['p95_ms']} ms, p99 {r['p99_ms']} ms, max {r['max_ms']} ms (lease {r['lease_ms']} ms); "
        f"vs POM's {r['pom_s']:.0f} s: {r['pom_ratio_p99']}x faster (p99)"))


@bench.command("kafka-bytes")
@click.option("--attempts", type=click.IntRange(100, 10_000_000), default=2_000, show_default=True,
              help="attempts replayed at the guide's 67,000/hour (2,000: about 2 min of dialing)")
@click.option("--attempts-per-hour", type=click.FloatRange(1000, 10_000_000), default=67_000, show_default=True,
              help="replay rate; records per batch follow it, so keep the guide's rate to measure its case")
@click.option("--json", "as_json", is_flag=True)
@topology_option
def bench_kafka_bytes(attempts: int, attempts_per_hour: float, as_json: bool, topology_path: str | None) -> None:
    """Bytes on the brokers' disks per dialing attempt over the six Event SDK topics, for the guide's event
    mix, produced with the real producer settings to a 3-broker Kafka (isolated copy of the topology)."""
    from pom_ha.bench.kafka import run_bench

    r = _run(run_bench(_topology(topology_path), attempts, echo=click.echo, attempts_per_hour=attempts_per_hour))
    click.echo(json.dumps(r) if as_json else (
        f"{r['bytes_per_attempt']:.0f} bytes/attempt over the six topics ({r['attempts']} attempts, "
        f"{r['events']} events, {r['log_bytes']:,} bytes in the leaders' log segments, compression "
        f"{r['compression']}, linger {r['linger_ms']} ms); the guide's settings taken literally: "
        f"{r['baseline_bytes_per_attempt']:.0f} bytes/attempt; the guide's sample {r['guide_bytes_per_attempt']:,}"))


@bench.command("console")
@click.option("--trials", type=click.IntRange(1, 500), default=20, show_default=True, help="lease takeovers")
@click.option("--viewers", type=click.IntRange(1, 500), default=20, show_default=True)
@click.option("--seconds", type=click.FloatRange(1, 600), default=10.0, show_default=True, help="overview load")
@click.option("--interval", "interval_s", type=click.FloatRange(0, 60), default=1.0, show_default=True,
              help="seconds between a viewer's reloads (0: back to back)")
@click.option("--url", default=None, help="a running web daemon (default: an isolated one is started)")
@click.option("--token", default=None, envvar="POM_CONSOLE_TOKEN", help="viewer token for --url")
@click.option("--block", type=click.IntRange(2, 250), default=62, show_default=True,
              help="address block of the isolated copy (127.0.BLOCK.N)")
@click.option("--json", "as_json", is_flag=True)
@topology_option
def bench_console(trials: int, viewers: int, seconds: float, interval_s: float, url: str | None,
                  token: str | None, block: int, as_json: bool, topology_path: str | None) -> None:
    """Lease change -> the console's live table showing it (SSE), and the overview's server time under
    concurrent viewers."""
    from pom_ha.bench.console import run_bench as run_console

    try:
        r = _run(run_console(_topology(topology_path), trials=trials, viewers=viewers, seconds=seconds,
                             interval_s=interval_s, url=url, token=token, block=block, echo=click.echo))
    except (ValueError, RuntimeError, TimeoutError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(json.dumps(r) if as_json else (
        f"lease change -> console shows it, {r['trials']} takeovers: p50 {r['update_p50_ms']} ms, p99 "
        f"{r['update_p99_ms']} ms (goal <= 1000; POM's monitor: stale for {r['pom_monitor_stale_s']:.0f} s)\n"
        f"overview under {r['viewers']} viewers: server time p50 {r['overview_p50_ms']} ms, p99 "
        f"{r['overview_p99_ms']} ms over {r['overview_pages']} pages (goal p99 <= 100)"))


# ---- campaign, list, job: campaign administration (pom_ha/campaign/cli.py) -------------------------------
for _group in CAMPAIGN_COMMANDS:
    main.add_command(_group)
# ---- kafka: the guide's Kafka HA procedure as commands (pom_ha/kafka/cli.py) --------------------------------
main.add_command(kafka_group)
# ---- lab: the whole local lab with every daemon and the demo campaign (pom_ha/lab/cli.py) -------------------
main.add_command(lab_group)
# ---- prometheus: scrape targets and config of the topology (pom_ha/infra/prometheus_cli.py) ------------------
main.add_command(prometheus_group)
# ---- zone: Agent Manager zone allocation, "Save" and "Save and Apply" (pom_ha/zones/cli.py) ------------------
main.add_command(zone_group)
# ---- user, token: console / REST API users and API tokens (pom_ha/web/cli.py) ---------------------------------
main.add_command(user_group)
main.add_command(token_group)
# ---- agents: the workspaces scenario (pom_ha/zones/sdk_link.py) --------------------------------------------------
main.add_command(agents_group)
# ---- chaos: fault runs, the history checker, the HA core's simulation (pom_ha/chaos/cli.py) ---------------
main.add_command(chaos_group)


if __name__ == "__main__":
    main()
