"""Auth of the web daemon against real servers: PostgreSQL and the daemon running on pom1 and pom2.

Sessions made on one server are valid on the other; logout, expiry and disable take effect on both at
once; CSRF, login throttling, roles, API tokens; every endpoint of the OpenAPI document answers 401
without a token; schemathesis against /v1/openapi.json with a token finds no 5xx and no answer outside
the schema; no password ever appears in the daemons' logs or in the audit log.

Run: ``POM_TEST_BLOCK=36 POM_TEST_SERVERS=postgres pytest -q tests/integration/test_console_auth.py``
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from yarl import URL

from pom_ha.infra.process import ProcessRecord
from pom_ha.infra.stack import Stack
from pom_ha.web import auth
from tests.integration.console_helpers import PASSWORDS, base, daemon_logs, login, me, pom_ha, token, wait_for, web

pytestmark = pytest.mark.integration
__all__ = ["web"]


@pytest.fixture
async def db(stack: Stack) -> Any:
    conn = await asyncpg.connect(stack.topo.postgres.dsn())
    yield conn
    await conn.close()


def _cookie(http: aiohttp.ClientSession, url: str) -> str:
    return http.cookie_jar.filter_cookies(URL(url))["pom_session"].value


async def _me_status(url: str, cookie: str) -> int:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        return (await me(http, url, headers={"Cookie": f"pom_session={cookie}"}))[0]


def _session(**kw: Any) -> aiohttp.ClientSession:
    # unsafe: the cookie jar keeps cookies for IP-address hosts (the lab's servers)
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), timeout=aiohttp.ClientTimeout(total=30),
                                 **kw)


async def test_every_endpoint_needs_a_token_or_session(stack: Stack, web: dict[str, ProcessRecord],
                                                       topology_file: Path) -> None:
    url = base(stack, "pom1")
    admin = token(stack, "admin")
    async with _session() as http:
        async with http.get(url + "/v1/openapi.json") as resp:
            assert resp.status == 401
        async with http.get(url + "/v1/openapi.json", headers={"Authorization": f"Bearer {admin}"}) as resp:
            doc = await resp.json()
        assert doc["openapi"] == "3.1.0"
        checked = 0
        for path, ops in doc["paths"].items():
            concrete = path.replace("{job_id}", "1").replace("{zone}", "Zone1")
            for method in ops:
                for headers in ({}, {"Authorization": "Bearer pomt_forged"}, {"Cookie": "pom_session=x.y"}):
                    async with http.request(method.upper(), url + concrete, headers=headers, json={}) as resp:
                        if path in ("/healthz", "/metrics"):  # open on loopback ([web] open_health_on_loopback)
                            assert resp.status == 200, (path, resp.status)
                        else:
                            assert resp.status == 401, (method, path, resp.status, await resp.text())
                            assert "token" in (await resp.json())["error"]
                checked += 1
        assert checked >= 14, doc["paths"].keys()
        # a path no route matches is 401 too: the API's shape is not visible without a login
        async with http.get(url + "/v1/nothing-here") as resp:
            assert resp.status == 401
        # a console page sends a browser to the login page instead
        async with http.get(url + "/jobs", headers={"Accept": "text/html"}, allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"].startswith("/login")


async def test_token_roles(stack: Stack, web: dict[str, ProcessRecord], topology_file: Path,
                           db: asyncpg.Connection) -> None:
    url = base(stack, "pom2")
    operator, admin = token(stack, "operator"), token(stack, "admin")
    done = pom_ha(topology_file, "token", "create", "--user", "t-viewer", "--role", "viewer")
    assert done.returncode == 0 and done.stdout.startswith("pomt_"), done.stderr
    viewer = done.stdout.strip()
    # a token's role cannot exceed its user's
    done = pom_ha(topology_file, "token", "create", "--user", "t-viewer", "--role", "admin")
    assert done.returncode == 1 and done.stderr.startswith("error: ") and "cannot exceed" in done.stderr
    async with _session() as http:
        async def call(tok: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
            async with http.request(method, url + path, json=body, headers={"Authorization": f"Bearer {tok}"}) as r:
                return r.status, await r.json()

        assert (await call(viewer, "GET", "/v1/status"))[0] == 200
        assert (await call(viewer, "GET", "/v1/jobs"))[0] == 200
        status, err = await call(viewer, "POST", "/v1/jobs/1/runtime", {"action": "pause"})
        assert status == 403 and err["needed_role"] == "operator", err
        status, err = await call(operator, "POST", "/v1/jobs/999999/runtime", {"action": "pause"})
        assert status == 404, err  # allowed, then the job is unknown
        status, err = await call(operator, "PUT", "/v1/zones/Zone1/allocation", {"server": "pom2"})
        assert status == 403 and err["needed_role"] == "admin", err
        assert (await call(operator, "GET", "/v1/audit"))[0] == 403
        status, body = await call(admin, "GET", "/v1/me")
        assert status == 200 and body == {"user": "t-admin", "role": "admin", "via": "token", "csrf": None}
        # revoked: refused at once
        assert await auth.revoke_token(db, viewer[:12]) == 1
        assert (await call(viewer, "GET", "/v1/status"))[0] == 401


async def test_session_on_one_server_is_valid_on_the_other_until_logout(
    stack: Stack, web: dict[str, ProcessRecord], db: asyncpg.Connection,
) -> None:
    one, two = base(stack, "pom1"), base(stack, "pom2")
    async with _session() as http:
        status, page = await login(http, one, "t-admin", PASSWORDS["admin"])
        assert status == 200 and 'id="component-table"' in page, page[:500]
        cookie = next(c for c in http.cookie_jar if c.key == "pom_session")
        assert cookie["httponly"] and cookie["samesite"] == "Strict" and not cookie["secure"]  # no TLS here
        value = cookie.value
    async with _session(headers={"Cookie": f"pom_session={value}"}) as http:
        status, who = await me(http, two)
        assert status == 200 and who["user"] == "t-admin" and who["via"] == "session", who
        csrf = who["csrf"]
        # a state-changing request with the session but without the CSRF token is refused, and audited
        async with http.put(two + "/v1/zones/Zone1/allocation", json={"server": "pom1"}) as resp:
            assert resp.status == 403 and (await resp.json())["field"] == "csrf"
        async with http.put(two + "/v1/zones/Zone1/allocation", json={"server": "pom1"},
                            headers={"X-CSRF-Token": "wrong"}) as resp:
            assert resp.status == 403
        async with http.put(two + "/v1/zones/Zone1/allocation", json={"server": "pom1"},
                            headers={"X-CSRF-Token": csrf}) as resp:
            assert resp.status == 200, await resp.text()
        # logout on pom2 ends the session everywhere
        async with http.post(two + "/logout", data={"csrf": csrf}, allow_redirects=False) as resp:
            assert resp.status == 303
        for url in (one, two):
            assert (await me(http, url))[0] == 401
    row = await db.fetchrow("SELECT actor, via, result FROM audit_log WHERE action = 'PUT /v1/zones/Zone1/allocation'"
                            " ORDER BY id DESC LIMIT 1")
    assert dict(row) == {"actor": "t-admin", "via": "session", "result": "200"}
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE actor = 't-admin' AND result = '403'"
                             " AND detail->>'csrf' = 'false'") >= 2


async def test_login_csrf_expiry_and_disable(stack: Stack, web: dict[str, ProcessRecord], topology_file: Path,
                                             db: asyncpg.Connection) -> None:
    one, two = base(stack, "pom1"), base(stack, "pom2")
    async with _session() as http:
        # a login form posted without its CSRF cookie/field pair is refused
        async with http.post(one + "/login", data={"user": "t-operator", "password": PASSWORDS["operator"]}) as resp:
            assert resp.status == 403 and "CSRF" in await resp.text()
        status, _ = await login(http, one, "t-operator", PASSWORDS["operator"])
        first = _cookie(http, one)
        assert status == 200 and await _me_status(two, first) == 200
        # expiry: the session's end passes -> refused by both servers
        await db.execute("UPDATE web_sessions SET expires_at = now() - interval '1 second'"
                         " WHERE user_name = 't-operator' AND ended_at IS NULL")
        assert await _me_status(one, first) == 401 and await _me_status(two, first) == 401
        status, _ = await login(http, two, "t-operator", PASSWORDS["operator"])
        assert status == 200 and await _me_status(one, _cookie(http, two)) == 200
    operator_token = token(stack, "operator")
    done = pom_ha(topology_file, "user", "disable", "t-operator")
    assert done.returncode == 0, done.stderr
    try:
        async with _session() as http:
            for url in (one, two):
                assert (await me(http, url, headers={"Authorization": f"Bearer {operator_token}"}))[0] == 401
            status, page = await login(http, one, "t-operator", PASSWORDS["operator"])
            assert status == 401 and "Wrong user name or password" in page
        assert await db.fetchval("SELECT count(*) FROM web_sessions WHERE user_name = 't-operator'"
                                 " AND ended_at IS NULL") == 0
    finally:
        assert pom_ha(topology_file, "user", "enable", "t-operator").returncode == 0


async def test_login_throttling_and_no_password_anywhere(stack: Stack, web: dict[str, ProcessRecord],
                                                         db: asyncpg.Connection) -> None:
    one = base(stack, "pom1")
    wrong = "not-the-password-" + PASSWORDS["viewer"][-6:]
    async with _session() as http:
        for _ in range(5):
            status, page = await login(http, one, "t-viewer", wrong)
            assert status == 401, page[:300]
        # the 6th, even with the right password, is throttled; so is the same user from pom2 (shared count)
        status, page = await login(http, one, "t-viewer", PASSWORDS["viewer"])
        assert status == 429 and "Too many failed sign-ins" in page
        status, _ = await login(http, base(stack, "pom2"), "t-viewer", PASSWORDS["viewer"])
        assert status == 429
    rows = await db.fetch("SELECT action, result, address FROM audit_log WHERE target = 't-viewer'"
                          " AND action LIKE 'login%' ORDER BY id")
    assert [r["action"] for r in rows][-7:] == ["login_failed"] * 5 + ["login_throttled"] * 2
    assert rows[-1]["result"] == "429" and rows[-1]["address"].startswith("127.")
    await db.execute("DELETE FROM web_login_failures WHERE user_name = 't-viewer'")
    # no password (right or wrong) in the audit log or in any daemon log
    audit = json.dumps([dict(r) for r in await db.fetch("SELECT * FROM audit_log")], default=str)
    logs = daemon_logs(web)
    for secret in [*PASSWORDS.values(), wrong]:
        assert secret not in audit and secret not in logs
    assert "t-viewer" in audit  # the check above would pass on an empty log: it is not empty


def test_schemathesis_finds_no_5xx_and_no_schema_violation(stack: Stack, web: dict[str, ProcessRecord],
                                                                 topology_file: Path, tmp_path: Path) -> None:
    admin = token(stack, "admin")
    url = base(stack, "pom1")
    cmd = [str(Path(sys.executable).with_name("schemathesis")), "run", url + "/v1/openapi.json",
           "-H", f"Authorization: Bearer {admin}",
           "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance,"
                       "content_type_conformance",
           "--phases", "examples,fuzzing", "--max-examples", "12", "--workers", "2",
           "--request-timeout", "20", "--suppress-health-check", "all", "--exclude-path", "/metrics",
           "--seed", "7"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert re.search(r"\d+ passed", out) or "passed" in out.lower(), out[-3000:]
    assert admin not in daemon_logs(web)


async def test_https_with_the_lab_ca(stack: Stack, web: dict[str, ProcessRecord], tmp_path: Path) -> None:
    """[web] tls_cert/tls_key: the daemon on pom3 serves HTTPS with a certificate of the lab CA; the session
    cookie is Secure; plain HTTP is not answered."""
    import ssl

    from pom_ha.config import dump_topology
    from pom_ha.infra.process import stop_process
    from pom_ha.lab.daemons import start_daemon
    from pom_ha.web.lab import web_certs

    topo = web_certs(stack.topo)
    tls_file = dump_topology(topo, topo.lab_dir() / "topology-tls.toml")
    rec = start_daemon(topo, tls_file, "pom3", "rest-api", "--port", "7793")
    url = f"https://{topo.server('pom3').address}:7793"
    context = ssl.create_default_context(cafile=str(topo.lab_dir() / "web-tls" / "ca.pem"))
    try:
        async with _session(connector=aiohttp.TCPConnector(ssl=context)) as http:
            async def up() -> bool:
                assert rec.alive(), daemon_logs({"pom3": rec})[-2000:]
                try:
                    async with http.get(url + "/healthz") as resp:
                        return resp.status == 200
                except aiohttp.ClientConnectorError:
                    return False

            await wait_for(up, 60, "the HTTPS web daemon on pom3")
            status, _ = await login(http, url, "t-admin", PASSWORDS["admin"])
            assert status == 200
            cookie = next(c for c in http.cookie_jar if c.key == "pom_session")
            assert cookie["secure"] and cookie["httponly"] and cookie["samesite"] == "Strict"
        async with aiohttp.ClientSession() as plain:
            with pytest.raises(aiohttp.ClientError):
                async with plain.get(url.replace("https", "http") + "/healthz") as resp:
                    await resp.read()
    finally:
        stop_process(rec, topo.lab_dir() / "run")
