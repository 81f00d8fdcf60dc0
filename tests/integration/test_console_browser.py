"""The console in a real browser (Debian's Chromium driven by Playwright) against real servers: the web
daemon on pom1 and pom2, PostgreSQL, real Campaign Director daemons, and (when the stack runs ActiveMQ) a
real Campaign Manager running a job.

* sign in, see the component table; a viewer is refused an operator action (403 in the UI and the API);
* Save and Apply: refused until the confirmation is ticked and the browser's dialog accepted;
* the master Campaign Director is SIGKILLed while the overview is open on the other server: the table
  and the timeline show the takeover without a reload;
* pause and resume of a running job from pom1's console, seen on pom2's console without a reload.

Run: ``POM_TEST_BLOCK=36 POM_TEST_SERVERS=postgres,activemq pytest -q tests/integration/test_console_browser.py``
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from playwright.async_api import Browser, Dialog, Page, async_playwright

from pom_ha.infra.process import ProcessRecord, log_tail, signal_process, stop_process
from pom_ha.infra.stack import Stack
from pom_ha.lab.daemons import start_daemon
from tests.integration.console_helpers import PASSWORDS, base, wait_for, web
from tests.integration.test_runtime_changes import cm, platform, rules

pytestmark = pytest.mark.integration
__all__ = ["cm", "platform", "rules", "web"]
CHROMIUM = os.environ.get("POM_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def db(stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(stack.topo.postgres.dsn())
    yield conn
    await conn.close()


async def signed_in(browser: Browser, url: str, role: str) -> Page:
    page = await (await browser.new_context()).new_page()
    page.set_default_timeout(15_000)
    await page.goto(url + "/login")
    await page.fill("#user", f"t-{role}")
    await page.fill("#password", PASSWORDS[role])
    await page.click("#signin")
    await page.wait_for_selector("#component-table")
    return page


async def test_sign_in_component_table_and_a_viewer_refused(stack: Stack, web: dict[str, ProcessRecord],
                                                             browser: Browser, db: asyncpg.Connection) -> None:
    url = base(stack, "pom1")
    page = await (await browser.new_context()).new_page()
    await page.goto(url + "/")  # not signed in: the login page
    assert "/login" in page.url
    await page.fill("#user", "t-viewer")
    await page.fill("#password", "wrong-password")
    await page.click("#signin")
    assert "Wrong user name or password" in await page.inner_text("#login-error")
    await page.context.close()

    await db.execute("INSERT INTO ha_member (service, server, instance_id, state, scopes, seen_at) VALUES"
                     " ('browser_probe', 'pom1', 'b1', 'MASTER', ARRAY['']::text[], now() + interval '1 hour'),"
                     " ('browser_probe', 'pom2', 'b2', 'DORMANT', ARRAY[]::text[], now() + interval '1 hour')"
                     " ON CONFLICT (service, server) DO UPDATE SET seen_at = EXCLUDED.seen_at")
    try:
        viewer = await signed_in(browser, url, "viewer")
        row = viewer.locator('#component-table tr[data-service="browser_probe"]')
        await row.wait_for()
        assert await row.locator('td[data-server="pom1"]').inner_text() == "MASTER"
        assert await row.locator('td[data-server="pom2"]').inner_text() == "DORMANT"
        assert await viewer.inner_text("#who") == "t-viewer (viewer)"
        # the real servers beside it, live (the stack's PostgreSQL answers; servers not started say so)
        await viewer.wait_for_selector("#servers-table", timeout=30_000)
        servers = await viewer.inner_text("#servers-table")
        assert "postgres" in servers and "primary" in servers, servers
        # the API refuses the operator action with 403, with the session's own CSRF token
        answer = await viewer.evaluate("""async () => {
            const me = await (await fetch('/v1/me')).json();
            const r = await fetch('/v1/jobs/1/runtime', {method: 'POST', body: '{"action": "pause"}',
                headers: {'Content-Type': 'application/json', 'X-CSRF-Token': me.csrf}});
            return [r.status, (await r.json()).error];
        }""")
        assert answer[0] == 403 and "operator needed" in answer[1], answer
        # the UI: no action buttons for a viewer, and the console's own action URL answers 403 too
        await viewer.goto(url + "/jobs")
        assert await viewer.locator('[data-action="pause"]').count() == 0
        ui = await viewer.evaluate("""async () => {
            const me = await (await fetch('/v1/me')).json();
            const r = await fetch('/console/jobs/1/runtime', {method: 'POST', body: 'action=pause',
                headers: {'Content-Type': 'application/x-www-form-urlencoded', 'X-CSRF-Token': me.csrf,
                          'Accept': 'text/html'}});
            return [r.status, await r.text()];
        }""")
        assert ui[0] == 403 and "Not allowed" in ui[1], ui
        resp = await viewer.goto(url + "/audit")
        assert resp is not None and resp.status == 403 and "role admin needed" in await viewer.inner_text("#error-text")
        await viewer.context.close()
    finally:
        await db.execute("DELETE FROM ha_member WHERE service = 'browser_probe'")


async def test_save_and_apply_needs_the_confirmation(stack: Stack, web: dict[str, ProcessRecord], browser: Browser,
                                                     db: asyncpg.Connection) -> None:
    await db.execute("DELETE FROM zone_apply_requests WHERE zone = 'Zone1'")
    page = await signed_in(browser, base(stack, "pom2"), "admin")
    await page.goto(base(stack, "pom2") + "/zones")
    form = page.locator("#zone-Zone1 form")
    await form.locator("select").select_option("pom3")
    dialogs: list[str] = []

    async def dismiss(d: Dialog) -> None:
        dialogs.append(d.message)
        await d.dismiss()

    # not ticked: refused in the page, nothing sent
    await form.locator('[data-action="apply"]').click()
    assert "Tick the confirmation first" in await page.inner_text("#zone-result-Zone1")
    # ticked, the browser's dialog dismissed: nothing sent
    page.once("dialog", dismiss)
    await form.locator("[data-confirm]").check()
    await form.locator('[data-action="apply"]').click()
    await wait_for(lambda: _true(bool(dialogs)), 10, "the confirmation dialog")
    assert "AM Zone reset will force log out all agents. Would you like to continue?" in dialogs[0]
    assert await db.fetchval("SELECT count(*) FROM zone_apply_requests WHERE zone = 'Zone1'") == 0

    async def accept(d: Dialog) -> None:
        await d.accept()

    page.once("dialog", accept)
    await form.locator('[data-action="apply"]').click()
    await page.wait_for_selector("#zone-result-Zone1 .result.ok")
    assert "saved and applied" in await page.inner_text("#zone-result-Zone1")
    row = await db.fetchrow("SELECT allocated_server, requested_by FROM zone_apply_requests WHERE zone = 'Zone1'")
    assert row["allocated_server"] == "pom3" and "t-admin" in row["requested_by"], row
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE action = 'POST /console/zones/Zone1'"
                             " AND actor = 't-admin' AND result = '202'") == 1
    await db.execute("DELETE FROM zone_apply_requests WHERE zone = 'Zone1'")
    await page.context.close()


async def _true(value: bool) -> bool:
    return value


@pytest.fixture
def directors(stack: Stack, topology_file: Path) -> Iterator[dict[str, ProcessRecord]]:
    recs = {s: start_daemon(stack.topo, topology_file, s, "campaign-director", "--zone", "Zone1")
            for s in ("pom1", "pom2")}
    try:
        yield recs
    finally:
        for rec in recs.values():
            stop_process(rec, stack.topo.lab_dir() / "run")


async def test_master_cd_killed_while_the_overview_is_open(stack: Stack, web: dict[str, ProcessRecord],
                                                           browser: Browser, db: asyncpg.Connection,
                                                           directors: dict[str, ProcessRecord]) -> None:
    async def master() -> str | None:
        for rec in directors.values():
            assert rec.alive(), log_tail(rec.log)
        return await db.fetchval("SELECT holder_server FROM ha_lease WHERE service = 'campaign_director'"
                                 " AND scope = '' AND expires_at > now() AND released_at IS NULL"
                                 " AND holder_server IN ('pom1', 'pom2')")

    old = str(await wait_for(master, 60, "a Campaign Director master"))
    new = "pom2" if old == "pom1" else "pom1"
    await wait_for(lambda: _member_up(db, new), 60, f"the Campaign Director on {new} registered")
    page = await signed_in(browser, base(stack, new), "admin")
    await page.wait_for_function(
        "s => document.querySelector(s) && document.querySelector(s).textContent.startsWith('MASTER')",
        arg=f'#component-table tr[data-service="campaign_director"] td[data-server="{old}"]')
    await page.wait_for_selector("#timeline-table")
    marker = await page.evaluate("() => { window.__noReload = 1; return 1; }")
    signal_process(directors[old], signal.SIGKILL)
    killed = time.monotonic()
    await page.wait_for_function(
        "s => document.querySelector(s) && document.querySelector(s).textContent.startsWith('MASTER')",
        arg=f'#component-table tr[data-service="campaign_director"] td[data-server="{new}"]', timeout=30_000)
    shown_s = time.monotonic() - killed
    old_cell = page.locator(f'#component-table tr[data-service="campaign_director"] td[data-server="{old}"]')
    assert not (await old_cell.inner_text()).startswith("MASTER")  # never two masters
    await page.wait_for_function(
        "s => [...document.querySelectorAll('#timeline-table tr')].some(r => r.textContent.includes(s))",
        arg=new, timeout=15_000)
    timeline = await page.inner_text("#timeline-table")
    assert "Campaign Director" in timeline and ("took_over" in timeline or "acquired" in timeline), timeline
    assert await page.evaluate("() => window.__noReload") == marker  # the same page: no reload
    print(f"\nmaster CD on {old} SIGKILLed -> {new} shown MASTER on its console after {shown_s:.2f} s (no reload)")
    assert shown_s < 15, shown_s
    await page.context.close()


async def _member_up(db: asyncpg.Connection, server: str) -> bool:
    return bool(await db.fetchval("SELECT 1 FROM ha_member WHERE service = 'campaign_director' AND server = $1"
                                  " AND state <> 'STOPPED' AND seen_at > now() - interval '3 seconds'", server))


def _activemq_running(stack: Stack) -> bool:
    only = [k for k in os.environ.get("POM_TEST_SERVERS", "").split(",") if k.strip()]
    return not only or "activemq" in only


@pytest.fixture
def manager(request: pytest.FixtureRequest, stack: Stack) -> tuple[ProcessRecord, str]:
    """A real Campaign Manager (with Rule Engines and the media simulator) when the stack runs ActiveMQ."""
    if not _activemq_running(stack):
        pytest.skip("needs ActiveMQ and a Campaign Manager (POM_TEST_SERVERS=postgres,activemq)")
    value: tuple[ProcessRecord, str] = request.getfixturevalue("cm")
    return value


async def test_pause_and_resume_seen_on_a_second_console(stack: Stack, web: dict[str, ProcessRecord],
                                                         browser: Browser, db: asyncpg.Connection,
                                                         manager: tuple[ProcessRecord, str]) -> None:
    from tests.integration.test_runtime_changes import cm_on_activemq, running_job, stop_job

    await cm_on_activemq(stack)
    job = await running_job(db, manager[1], 20_000, 5)
    try:
        one = await signed_in(browser, base(stack, "pom1"), "operator")
        two = await signed_in(browser, base(stack, "pom2"), "viewer")
        await one.goto(base(stack, "pom1") + "/jobs")
        await two.goto(base(stack, "pom2") + "/jobs")
        state_two = two.locator(f'[data-job-state="{job}"]')
        assert await state_two.inner_text() == "Running"
        row = one.locator(f"#job-{job}")
        # a bad pacing value: the API's own error text next to the field
        await row.locator('[data-field="value"]').fill("-3")
        await row.locator('[data-action="pacing_rate"]').click()
        await one.wait_for_selector(f'#result-{job} .result.refused[data-field="value"]')
        assert "(0, 100000]" in await one.inner_text(f"#result-{job}")
        await row.locator('[data-action="pause"]').click()
        await one.wait_for_selector(f"#result-{job} .result.ok")
        assert "Running -> Paused" in await one.inner_text(f"#result-{job}")
        await two.wait_for_function(f"() => document.querySelector('[data-job-state=\"{job}\"]').textContent"
                                    " === 'Paused'", timeout=15_000)
        await row.locator('[data-action="pause"]').click()  # a second pause: the API's refusal, shown
        await one.wait_for_selector(f"#result-{job} .result.refused")
        assert "Paused" in await one.inner_text(f"#result-{job}")
        await row.locator('[data-action="resume"]').click()
        await one.wait_for_selector(f"#result-{job} .result.ok")
        await two.wait_for_function(f"() => document.querySelector('[data-job-state=\"{job}\"]').textContent"
                                    " === 'Running'", timeout=15_000)
        rows = await db.fetch("SELECT action, result FROM audit_log WHERE target = $1 AND actor = 't-operator'"
                              " ORDER BY id", str(job))
        assert [r["result"] for r in rows][-4:] == ["400", "200", "409", "200"], rows
        for p in (one, two):
            await p.context.close()
    finally:
        await stop_job(db, job)
