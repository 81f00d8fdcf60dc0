"""Shared by the console tests: the web daemon on two servers (real processes), users made with the CLI,
and signing in like a browser (the login form's CSRF cookie, then the session cookie)."""

from __future__ import annotations

import asyncio
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from pom_ha.config import REPO_ROOT
from pom_ha.infra.process import ProcessRecord, log_tail, stop_process
from pom_ha.infra.stack import Stack
from pom_ha.lab.daemons import start_daemon
from pom_ha.web import auth

WEB_PORT = 7791
SERVERS = ("pom1", "pom2")
# one password per role, made per test session (never in argv: the CLI reads it from stdin)
PASSWORDS = {role: f"pw-{role}-{secrets.token_hex(6)}" for role in ("admin", "operator", "viewer")}


def pom_ha(topology_file: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pom_ha.cli", *args, "--topology", str(topology_file)],
                          input=stdin, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)


def base(stack: Stack, server: str) -> str:
    return f"http://{stack.topo.server(server).address}:{WEB_PORT}"


@pytest.fixture(scope="module")
def web(stack: Stack, topology_file: Path) -> Iterator[dict[str, ProcessRecord]]:
    """The web daemon (REST API + console) on pom1 and pom2, and three users: admin, operator, viewer."""
    recs = {s: start_daemon(stack.topo, topology_file, s, "rest-api", "--port", str(WEB_PORT)) for s in SERVERS}
    try:
        # the admin through the CLI (password on stdin, never in argv), the others through the library
        done = pom_ha(topology_file, "user", "add", "t-admin", "--role", "admin", "--password-stdin",
                      stdin=PASSWORDS["admin"] + "\n")
        assert done.returncode == 0 or "already exists" in done.stderr, done.stderr

        async def others() -> None:
            conn = await asyncpg.connect(stack.topo.postgres.dsn())
            try:
                for role in ("operator", "viewer"):
                    if not await conn.fetchval("SELECT 1 FROM web_users WHERE name = $1", f"t-{role}"):
                        await auth.add_user(conn, f"t-{role}", role, PASSWORDS[role])
            finally:
                await conn.close()

        asyncio.run(others())
        deadline = time.monotonic() + 60
        for server, rec in recs.items():
            while True:
                assert rec.alive(), f"web daemon on {server} exited:\n{log_tail(rec.log)}"
                try:
                    import urllib.request

                    with urllib.request.urlopen(base(stack, server) + "/healthz", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, f"web daemon on {server} not answering:\n{log_tail(rec.log)}"
                time.sleep(0.1)
        yield recs
    finally:
        for rec in recs.values():
            stop_process(rec, stack.topo.lab_dir() / "run")


def token(stack: Stack, role: str) -> str:
    """A token of user t-<role> (the library's create_token; the CLI is tested once in test_token_roles)."""
    async def go() -> str:
        conn = await asyncpg.connect(stack.topo.postgres.dsn())
        try:
            return await auth.create_token(conn, f"t-{role}", role)
        finally:
            await conn.close()

    return asyncio.run(go()) if not _running() else _in_thread(go)


def _running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _in_thread(fn: Any) -> str:
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(fn())).result()


async def login(http: aiohttp.ClientSession, url: str, user: str, password: str) -> tuple[int, str]:
    """The browser's way: GET the form (CSRF cookie + field), POST it; returns (status, final page)."""
    async with http.get(url + "/login") as resp:
        page = await resp.text()
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, page
    form = {"csrf": match.group(1), "user": user, "password": password, "next": "/"}
    async with http.post(url + "/login", data=form, allow_redirects=True) as resp:
        return resp.status, await resp.text()


async def me(http: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any]:
    async with http.get(url + "/v1/me", **kw) as resp:
        return resp.status, (await resp.json()) if resp.content_type == "application/json" else await resp.text()


async def wait_for(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(0.05)


def daemon_logs(recs: dict[str, ProcessRecord]) -> str:
    return "".join(Path(rec.log).read_text(errors="replace") for rec in recs.values())
