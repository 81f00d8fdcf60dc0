"""``python -m services.rest_api --server pom1 [--topology FILE] [--port N] [--runtime-timeout S]``.

Listens on the POM server's address at ``ports.rest_api`` (or ``--port``) and serves the REST API of
:mod:`pom_ha.web.app`. Stateless: any number of servers may run one; SIGTERM/SIGINT stop it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
import sys

import structlog
from aiohttp import web

from pom_ha.config import ConfigError, Topology, load_topology
from pom_ha.ha.logsetup import configure_logging
from pom_ha.ha.sdnotify import notify
from pom_ha.web.app import DEFAULT_RUNTIME_TIMEOUT_S, RestApi

log = structlog.get_logger("services.rest_api")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rest-api", description=__doc__)
    p.add_argument("--server", required=True, help="POM server name from the topology (pom1)")
    p.add_argument("--topology", default=None, help="topology file (default config/lab.toml or POM_TOPOLOGY)")
    p.add_argument("--port", type=int, default=None, help="listen port (default ports.rest_api)")
    p.add_argument("--runtime-timeout", type=float, default=DEFAULT_RUNTIME_TIMEOUT_S,
                   help="default seconds a runtime change may take (a request's timeout_s overrides it)")
    p.add_argument("--instance-tag", default=None, help="free-form tag (the lab uses it to find the process)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def serve(topo: Topology, server: str, port: int, runtime_timeout_s: float) -> int:
    address = topo.server(server).address
    try:
        context = server_ssl_context(topo, server)
    except (OSError, ssl.SSLError) as exc:
        print(f"error: [web] tls_cert/tls_key of {server}: {exc}", file=sys.stderr)
        return 1
    api = RestApi(topo, server, runtime_timeout_s=runtime_timeout_s)
    runner = web.AppRunner(api.app(), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, address, port, ssl_context=context).start()
    except OSError as exc:
        await runner.cleanup()
        print(f"error: cannot listen on {address}:{port}: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("REST API and console listening", server=server, address=f"{address}:{port}",
             tls=context is not None)
    notify("READY=1", f"STATUS=listening on {address}:{port}")
    await stop.wait()
    notify("STOPPING=1")
    log.info("REST API stopping", server=server)
    await runner.cleanup()
    return 0


def server_ssl_context(topo: Topology, server: str) -> ssl.SSLContext | None:
    """HTTPS when ``[web] tls_cert``/``tls_key`` are set (``{server}`` in them is this server's name)."""
    if not topo.web.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(topo.web.tls_cert.format(server=server), topo.web.tls_key.format(server=server))
    return context


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    try:
        topo = load_topology(args.topology)
        topo.server(args.server)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not 0.5 <= args.runtime_timeout <= 300:
        print("error: --runtime-timeout must be in [0.5, 300] seconds", file=sys.stderr)
        return 2
    port = topo.ports.rest_api if args.port is None else args.port
    return asyncio.run(serve(topo, args.server, port, args.runtime_timeout))


if __name__ == "__main__":
    sys.exit(main())
