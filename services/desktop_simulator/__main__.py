"""``python -m services.desktop_simulator --server pom1 --zone Z --agents N [--talk-s T] [--wrap-s W]``
(also ``pom-ha run desktop-simulator ...``).

Runs N bot agents (``pom_ha.desktop.client.BotAgent``) of zone Z. Each desktop knows every Agent Manager
address of the topology (``<server address>:ports.desktop``, ``--server``'s first), logs in, goes ready,
answers the calls the manager offers, talks ``--talk-s``, releases, wraps up after ``--wrap-s``; it
attaches to ``--job`` at login (an agent without a job is offered no
call), reconnects and logs in again after a failover (keeping the call it is on: it reports it to the new
master and finishes it there) or a forced logout (e.g. "Save and Apply"). Every
``--report-s`` one JSON log line gives the counts (``simulator report``). SIGTERM/SIGINT: the desktops
close and the process exits 0 after a final report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl
import sys
from dataclasses import dataclass
from typing import Any

import structlog

from pom_ha.config import ConfigError, load_topology
from pom_ha.desktop.client import BotAgent, BotSettings, DesktopClient
from pom_ha.desktop.tls import DesktopTlsError, client_context
from pom_ha.ha.logsetup import configure_logging

log = structlog.get_logger("services.desktop_simulator")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="desktop-simulator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", required=True, help="POM server the simulator runs beside (its AM is tried first)")
    p.add_argument("--topology", default=None, help="topology file (default config/lab.toml or POM_TOPOLOGY)")
    p.add_argument("--zone", required=True, help="zone the agents log in to")
    p.add_argument("--agents", type=int, required=True, help="number of bot agents (1-5000)")
    p.add_argument("--talk-s", type=float, default=5.0, help="mean talk time in seconds")
    p.add_argument("--wrap-s", type=float, default=2.0, help="mean wrap-up time in seconds")
    p.add_argument("--jitter", type=float, default=0.2, help="talk/wrap times drawn within ± this fraction")
    p.add_argument("--completion-code", default="SALE")
    p.add_argument("--job", default="sim-job", help="job every agent attaches to at login ('' = none: no calls)")
    p.add_argument("--agent-prefix", default=None, help="agent ids are <prefix><n> (default sim-<zone>-)")
    p.add_argument("--report-s", type=float, default=5.0, help="seconds between count reports (0.1-3600)")
    p.add_argument("--port", type=int, default=None, help="desktop port (default ports.desktop)")
    p.add_argument("--tls-ca", default=None, help="PEM CA of the AMs' desktop-port certificates: connect over TLS")
    p.add_argument("--instance-tag", default=None, help="free-form tag (the lab uses it to find the process)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


@dataclass
class Bot:
    client: DesktopClient
    agent: BotAgent
    task: asyncio.Task[None] | None = None


class Simulator:
    def __init__(self, addresses: list[tuple[str, int]], zone: str, agent_ids: list[str], settings: BotSettings,
                 report_s: float, ssl_context: ssl.SSLContext | None = None) -> None:
        self.zone = zone
        self.report_s = report_s
        self.bots: list[Bot] = []
        for a in agent_ids:
            client = DesktopClient(addresses, a, zone, desktop_id=f"sim-{a}", ssl_context=ssl_context)
            self.bots.append(Bot(client, BotAgent(client, settings)))

    def counts(self) -> dict[str, Any]:
        c = [b.client for b in self.bots]
        s = [b.agent.stats for b in self.bots]
        forced: dict[str, int] = {}
        for client in c:
            for reason, n in client.stats.forced_logouts.items():
                forced[reason] = forced.get(reason, 0) + n
        return {
            "zone": self.zone, "agents": len(self.bots),
            "logged_in": sum(x.logged_in.is_set() for x in c), "available": sum(x.available.is_set() for x in c),
            "logins": sum(x.stats.logins for x in c), "connection_losses": sum(x.stats.connection_losses for x in c),
            "calls_answered": sum(x.calls_answered for x in s), "calls_released": sum(x.calls_released for x in s),
            "wrapups": sum(x.wrapups for x in s), "previews_accepted": sum(x.previews_accepted for x in s),
            "callbacks_accepted": sum(x.callbacks_accepted for x in s), "refused": sum(x.refused for x in s),
            "forced_logouts": forced,
            "masters": sorted({x.session.master for x in c if x.session is not None}),
        }

    async def run(self, stop: asyncio.Event) -> None:
        for bot in self.bots:
            bot.client.start()
            bot.task = asyncio.create_task(bot.agent.run(), name=f"bot-{bot.client.agent_id}")
        log.info("simulator started", zone=self.zone, agents=len(self.bots))
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.report_s):
                        await stop.wait()
                log.info("simulator report", **self.counts())
        finally:
            await self.close()
            log.info("simulator stopped", **self.counts())

    async def close(self) -> None:
        for bot in self.bots:
            if bot.task is not None:
                bot.task.cancel()
        await asyncio.gather(*(b.client.close() for b in self.bots), return_exceptions=True)
        await asyncio.gather(*(b.task for b in self.bots if b.task is not None), return_exceptions=True)


async def amain(sim: Simulator) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await sim.run(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    try:
        topo = load_topology(args.topology)
        server = topo.server(args.server)
        zones = [z.name for z in topo.zones]
        if args.zone not in zones:
            raise ConfigError(f"--zone: {args.zone!r} is not a zone of the topology {zones}")
        if not 1 <= args.agents <= 5000:
            raise ConfigError("--agents must be 1..5000")
        if not 0.1 <= args.report_s <= 3600:
            raise ConfigError("--report-s must be 0.1..3600")
        settings = BotSettings(talk_s=args.talk_s, wrap_s=args.wrap_s, jitter=args.jitter,
                               completion_code=args.completion_code, job_id=args.job or None)
        tls = None if args.tls_ca is None else client_context(args.tls_ca)
    except (ConfigError, ValueError, DesktopTlsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    port = topo.ports.desktop if args.port is None else args.port
    addresses = [(server.address, port)] + [(s.address, port) for s in topo.servers if s.name != server.name]
    prefix = args.agent_prefix if args.agent_prefix is not None else f"sim-{args.zone}-"
    agent_ids = [f"{prefix}{i:04d}" for i in range(1, args.agents + 1)]
    return asyncio.run(amain(Simulator(addresses, args.zone, agent_ids, settings, args.report_s, tls)))


if __name__ == "__main__":
    sys.exit(main())
