"""``pom-ha user ...`` and ``pom-ha token ...``: the console's and the REST API's users and API tokens.

A password is never taken from the command line (it would be in the shell history and in ``ps``): it is
asked at a prompt, or read from standard input (``--password-stdin``) or from a file (``--password-file``).
A token is printed once, on standard output; only its hash is kept.
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path
from typing import Any

import asyncpg
import click

from pom_ha.cli_support import run_or_exit, topology_option, topology_or_exit
from pom_ha.config import Topology
from pom_ha.infra.process import InfraError
from pom_ha.web import auth


async def _conn(topo: Topology) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(topo.postgres.dsn(), timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise InfraError(f"cannot reach PostgreSQL at {topo.postgres.address}:{topo.postgres.port}: "
                         f"{type(exc).__name__}") from None


async def _audit(conn: asyncpg.Connection, action: str, target: str, result: str, detail: dict[str, Any]) -> None:
    actor = os.environ.get("SUDO_USER") or getpass.getuser()
    await auth.audit(conn, actor=actor, role=None, via="cli", address="local", server="", action=action,
                     target=target, result=result, detail=detail)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def read_password(password_stdin: bool, password_file: str | None, *, confirm: bool = True) -> str:
    if password_stdin and password_file:
        click.echo("error: --password-stdin and --password-file go alone", err=True)
        sys.exit(2)
    if password_file:
        try:
            return Path(password_file).read_text().rstrip("\r\n")
        except OSError as exc:
            _fail(f"cannot read {password_file}: {exc.strerror}")
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        _fail("no terminal to ask the password on: use --password-stdin or --password-file")
    value: str = click.prompt("Password", hide_input=True, confirmation_prompt=confirm)
    return value


async def _run(topo: Topology, fn: Any, *args: Any) -> Any:
    conn = await _conn(topo)
    try:
        return await fn(conn, *args)
    finally:
        await conn.close()


@click.group("user")
def user_group() -> None:
    """Console and REST API users (PostgreSQL, argon2id): add, list, disable, enable, password."""


@user_group.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(auth.ROLES), required=True)
@click.option("--password-stdin", is_flag=True, help="read the password from the first line of standard input")
@click.option("--password-file", type=click.Path(dir_okay=False), default=None, help="read it from this file")
@topology_option
def user_add(name: str, role: str, password_stdin: bool, password_file: str | None, topology_path: str | None) -> None:
    """Create a user (the first administrator: `pom-ha user add admin --role admin`)."""
    topo = topology_or_exit(topology_path)
    try:
        auth.check_user_name(name)
    except auth.AuthError as exc:
        _fail(str(exc))
    password = read_password(password_stdin, password_file)

    async def go(conn: asyncpg.Connection) -> None:
        await auth.add_user(conn, name, role, password)
        await _audit(conn, "user_add", name, "ok", {"role": role})

    try:
        run_or_exit(_run(topo, go))
    except auth.AuthError as exc:
        _fail(str(exc))
    click.echo(f"user {name} added ({role})")


@user_group.command("list")
@topology_option
def user_list(topology_path: str | None) -> None:
    """Users with their role and whether they are disabled."""
    rows = run_or_exit(_run(topology_or_exit(topology_path), auth.list_users))
    for r in rows:
        click.echo(f"{r['name']}\t{r['role']}\t{'disabled' if r['disabled'] else 'enabled'}")


def _set_disabled(name: str, disabled: bool, topology_path: str | None) -> None:
    async def go(conn: asyncpg.Connection) -> None:
        await auth.set_disabled(conn, name, disabled)
        await _audit(conn, "user_disable" if disabled else "user_enable", name, "ok", {})

    try:
        run_or_exit(_run(topology_or_exit(topology_path), go))
    except auth.AuthError as exc:
        _fail(str(exc))


@user_group.command("disable")
@click.argument("name")
@topology_option
def user_disable(name: str, topology_path: str | None) -> None:
    """Disable a user: its sessions and tokens are refused by every server from the next request on."""
    _set_disabled(name, True, topology_path)
    click.echo(f"user {name} disabled; its sessions are ended")


@user_group.command("enable")
@click.argument("name")
@topology_option
def user_enable(name: str, topology_path: str | None) -> None:
    """Enable a disabled user again (it signs in anew)."""
    _set_disabled(name, False, topology_path)
    click.echo(f"user {name} enabled")


@user_group.command("password")
@click.argument("name")
@click.option("--password-stdin", is_flag=True)
@click.option("--password-file", type=click.Path(dir_okay=False), default=None)
@topology_option
def user_password(name: str, password_stdin: bool, password_file: str | None, topology_path: str | None) -> None:
    """Set a user's password."""
    topo = topology_or_exit(topology_path)
    password = read_password(password_stdin, password_file)

    async def go(conn: asyncpg.Connection) -> None:
        await auth.set_password(conn, name, password)
        await _audit(conn, "user_password", name, "ok", {})

    try:
        run_or_exit(_run(topo, go))
    except auth.AuthError as exc:
        _fail(str(exc))
    click.echo(f"password of {name} set")


@click.group("token")
def token_group() -> None:
    """REST API tokens (`Authorization: Bearer ...`): create (shown once), revoke."""


@token_group.command("create")
@click.option("--user", "user", required=True)
@click.option("--role", type=click.Choice(auth.ROLES), required=True, help="at most the user's role")
@click.option("--ttl-days", type=click.FloatRange(0.001, 3650), default=None, help="expiry (default: none)")
@topology_option
def token_create(user: str, role: str, ttl_days: float | None, topology_path: str | None) -> None:
    """Create a token and print it once (only its hash is kept)."""
    async def go(conn: asyncpg.Connection) -> str:
        token = await auth.create_token(conn, user, role, ttl_days=ttl_days)
        await _audit(conn, "token_create", user, "ok", {"role": role, "token": token[:12]})
        return token

    try:
        token = run_or_exit(_run(topology_or_exit(topology_path), go))
    except auth.AuthError as exc:
        _fail(str(exc))
    click.echo(token)
    click.echo(f"token for {user} ({role}); shown once: store it now (revoke: pom-ha token revoke {token[:12]})",
               err=True)


@token_group.command("revoke")
@click.argument("prefix")
@topology_option
def token_revoke(prefix: str, topology_path: str | None) -> None:
    """Revoke the token(s) starting with PREFIX (the 12 characters printed at creation)."""
    async def go(conn: asyncpg.Connection) -> int:
        n = await auth.revoke_token(conn, prefix)
        await _audit(conn, "token_revoke", prefix, "ok" if n else "none", {"revoked": n})
        return n

    n = run_or_exit(_run(topology_or_exit(topology_path), go))
    if not n:
        _fail(f"no live token starts with {prefix!r}")
    click.echo(f"revoked {n} token(s)")
