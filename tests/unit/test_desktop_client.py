"""Desktop client and bot agent against in-process fake Agent Managers: login, heartbeats both ways,
failover to the next address with POMNotAvailable then POMAvailable, the post-takeover state query, forced
logouts, and a bot that answers, talks, releases and wraps up on its own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from pom_ha.desktop.client import (
    BotAgent,
    BotSettings,
    DesktopClient,
    DesktopSettings,
    DesktopUnavailable,
    RequestRefused,
)
from pom_ha.desktop.protocol import (
    AgentStateFrame,
    CallEvent,
    ErrorFrame,
    ForcedLogout,
    Heartbeat,
    JobAttach,
    Login,
    LoginOk,
    Ok,
    PomAvailable,
    PomNotAvailable,
    PreviewAccept,
    PreviewOffered,
    Ready,
    StateQuery,
    StateReport,
    ToDesktop,
    ToManager,
    WrapUp,
    read_frame,
    write_frame,
)
from pom_ha.domain.agents import CallState
from pom_ha.ha.retry import Backoff


class FakeManager:
    """Answers LOGIN with LOGIN_OK + POM_AVAILABLE + AGENT_STATE (a fresh agent), requests with OK (or ERROR when
    ``refuse`` says so), heartbeats with heartbeats (unless ``silent``), and records what it received. An agent
    in ``takeover`` is a stored agent of a zone being taken over: its login gets LOGIN_OK + POM_NOT_AVAILABLE +
    STATE_QUERY, and its STATE_REPORT POM_AVAILABLE + that AGENT_STATE (the manager's account after Table 9)."""

    def __init__(self, name: str, *, heartbeat_ms: int = 50, miss_limit: int = 3) -> None:
        self.name = name
        self.heartbeat_ms, self.miss_limit = heartbeat_ms, miss_limit
        self.received: list[ToManager] = []
        self.writers: dict[str, asyncio.StreamWriter] = {}
        self.silent = False
        self.refuse: Callable[[ToManager], ErrorFrame | None] = lambda frame: None
        self.frame_arrived = asyncio.Event()
        self.peers: list[str] = []
        self.takeover: dict[str, AgentStateFrame] = {}
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self.writers.values():
            writer.transport.abort()
        await self._server.wait_closed()

    async def push(self, agent_id: str, frame: ToDesktop) -> None:
        await write_frame(self.writers[agent_id], frame)

    async def wait_for(self, predicate: Callable[[ToManager], bool], within_s: float = 3.0) -> ToManager:
        async with asyncio.timeout(within_s):
            while True:
                for frame in self.received:
                    if predicate(frame):
                        return frame
                self.frame_arrived.clear()
                await self.frame_arrived.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        agent = None
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            while (frame := await read_frame(reader, "to_manager")) is not None:
                self.received.append(frame)
                self.frame_arrived.set()
                if isinstance(frame, Heartbeat):
                    if not self.silent:
                        await write_frame(writer, Heartbeat(seq=frame.seq))
                    continue
                if isinstance(frame, StateReport | CallEvent) and frame.req is None:
                    continue
                if isinstance(frame, Login):
                    agent = frame.agent_id
                    self.writers[agent] = writer
                    await write_frame(writer, LoginOk(
                        req=frame.req, agent_id=agent, zone=frame.zone, session_id=f"{self.name}-{agent}",
                        master=self.name, epoch=1, heartbeat_interval_ms=self.heartbeat_ms,
                        heartbeat_miss_limit=self.miss_limit, manager_addresses=self.peers,
                    ))
                    if agent in self.takeover:
                        await write_frame(writer, PomNotAvailable(zone=frame.zone, reason="taking the zone over"))
                        await write_frame(writer, StateQuery(req=900))
                        continue
                    await write_frame(writer, PomAvailable(zone=frame.zone, master=self.name, epoch=1))
                    await write_frame(writer, AgentStateFrame(logged_in=True, ready=False, call_state=CallState.IDLE))
                    continue
                if isinstance(frame, StateReport):
                    if agent in self.takeover:
                        await write_frame(writer, PomAvailable(zone="zone1", master=self.name, epoch=2))
                        await write_frame(writer, self.takeover.pop(agent))
                    continue
                error = self.refuse(frame)
                await write_frame(writer, error or Ok(req=frame.req))  # type: ignore[arg-type]
        writer.close()


@pytest.fixture
async def managers() -> AsyncIterator[tuple[FakeManager, FakeManager]]:
    first, second = FakeManager("pom1"), FakeManager("pom2")
    await first.start()
    await second.start()
    yield first, second
    for manager in (first, second):
        with contextlib.suppress(Exception):
            await manager.stop()


def _settings() -> DesktopSettings:
    return DesktopSettings(connect_timeout_s=0.5, reply_timeout_s=1.0, backoff=Backoff(initial_s=0.01, max_s=0.05))


@contextlib.asynccontextmanager
async def _client(addresses: list[tuple[str, int]], **kwargs: Any) -> AsyncIterator[DesktopClient]:
    client = DesktopClient(addresses, "agent7", "zone1", settings=_settings(), **kwargs)
    client.start()
    try:
        yield client
    finally:
        await client.close()


async def _next_event(client: DesktopClient, kind: type[Any], within_s: float = 3.0) -> Any:
    async with asyncio.timeout(within_s):
        while True:
            frame = await client.events.get()
            if isinstance(frame, kind):
                return frame


async def test_login_heartbeats_both_ways_and_requests(managers: tuple[FakeManager, FakeManager]) -> None:
    pom1, _ = managers
    async with _client([("127.0.0.1", pom1.port)]) as client:
        ok = await _next_event(client, LoginOk)
        assert ok.master == "pom1" and client.logged_in.is_set()
        await asyncio.wait_for(client.available.wait(), 2)
        assert isinstance(await client.ready(), Ok)
        assert isinstance(await client.job_attach("job1"), Ok)
        await pom1.wait_for(lambda f: isinstance(f, Heartbeat) and f.seq >= 2)
        assert client.stats.heartbeats_received >= 2
        assert [type(f) for f in pom1.received if not isinstance(f, Heartbeat)] == [Login, Ready, JobAttach]


async def test_refused_request_raises_with_the_managers_error(managers: tuple[FakeManager, FakeManager]) -> None:
    pom1, _ = managers
    pom1.refuse = lambda f: ErrorFrame(req=f.req, code="invalid_transition", reason="cannot wrap_up: Idle",  # type: ignore[union-attr]
                                       fatal=False) if isinstance(f, WrapUp) else None
    async with _client([("127.0.0.1", pom1.port)]) as client:
        await asyncio.wait_for(client.logged_in.wait(), 2)
        with pytest.raises(RequestRefused, match="invalid_transition"):
            await client.wrap_up("c1", "SALE")
        assert isinstance(await client.ready(), Ok)  # the session goes on


async def test_failover_to_the_next_address_reports_not_available_then_available(
    managers: tuple[FakeManager, FakeManager],
) -> None:
    pom1, pom2 = managers
    pom1.peers = [f"127.0.0.1:{pom2.port}"]  # learnt at login, not configured
    async with _client([("127.0.0.1", pom1.port)]) as client:
        await _next_event(client, LoginOk)
        await _next_event(client, PomAvailable)
        assert ("127.0.0.1", pom2.port) in client.addresses
        await pom1.stop()
        lost = await _next_event(client, PomNotAvailable)
        assert "connection" in lost.reason
        ok = await _next_event(client, LoginOk)
        assert ok.master == "pom2"
        await _next_event(client, PomAvailable)
        assert client.stats.logins == 2 and client.stats.connection_losses == 1
        assert isinstance(await client.ready(), Ok)


async def test_silent_manager_is_left_after_the_heartbeat_miss_limit(
    managers: tuple[FakeManager, FakeManager],
) -> None:
    pom1, pom2 = managers
    pom1.silent = True
    async with _client([("127.0.0.1", pom1.port), ("127.0.0.1", pom2.port)]) as client:
        ok = await _next_event(client, LoginOk)
        assert ok.master == "pom1"
        await _next_event(client, PomNotAvailable)
        assert (await _next_event(client, LoginOk)).master == "pom2"
        assert client.stats.loss_causes == {"heartbeat_timeout": 1}


async def test_request_without_a_manager_is_unavailable() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with _client([("127.0.0.1", port)]) as client:
        with pytest.raises(DesktopUnavailable, match="not logged in"):
            await client.ready()


async def test_state_query_is_answered_from_the_desktops_account(managers: tuple[FakeManager, FakeManager]) -> None:
    pom1, _ = managers
    state = (CallState.TALKING, "c1", "job1")
    async with _client([("127.0.0.1", pom1.port)], state_report=lambda: state) as client:
        await asyncio.wait_for(client.logged_in.wait(), 2)
        await pom1.push("agent7", StateQuery(req=42))
        report = await pom1.wait_for(lambda f: isinstance(f, StateReport))
        assert report == StateReport(req=42, call_state=CallState.TALKING, call_id="c1", job_id="job1")


async def test_forced_logout_logs_in_again_except_after_a_second_login(
    managers: tuple[FakeManager, FakeManager],
) -> None:
    pom1, _ = managers
    async with _client([("127.0.0.1", pom1.port)]) as client:
        await _next_event(client, LoginOk)
        await pom1.push("agent7", ForcedLogout(reason="desktop_error", detail="manager says Talking"))
        await _next_event(client, ForcedLogout)
        await _next_event(client, LoginOk)  # the agent logs in again
        await pom1.push("agent7", ForcedLogout(reason="second_login", detail="desk-9 logged in"))
        await asyncio.wait_for(client.stopped.wait(), 2)
        assert client.stats.forced_logouts == {"desktop_error": 1, "second_login": 1}
        assert sum(isinstance(f, Login) for f in pom1.received) == 2


async def test_bot_answers_talks_releases_and_wraps_up(managers: tuple[FakeManager, FakeManager]) -> None:
    pom1, _ = managers
    async with _client([("127.0.0.1", pom1.port)]) as client:
        bot = BotAgent(client, BotSettings(talk_s=0.05, wrap_s=0.02, completion_code="SALE", job_id="job1"))
        runner = asyncio.create_task(bot.run())
        try:
            await pom1.wait_for(lambda f: isinstance(f, Ready))
            assert any(isinstance(f, JobAttach) and f.job_id == "job1" for f in pom1.received)
            await pom1.push("agent7", CallEvent(call_id="c1", event="offered"))
            await pom1.wait_for(lambda f: isinstance(f, CallEvent) and f.event == "answered")
            await pom1.wait_for(lambda f: isinstance(f, CallEvent) and f.event == "released")
            wrap = await pom1.wait_for(lambda f: isinstance(f, WrapUp))
            assert isinstance(wrap, WrapUp) and (wrap.call_id, wrap.completion_code) == ("c1", "SALE")

            # A preview: accept, the manager reports the answer, the customer hangs up, the bot wraps up.
            await pom1.push("agent7", PreviewOffered(call_id="p1", job_id="job1", contact_id="k1", phone="+1555"))
            await pom1.wait_for(lambda f: isinstance(f, PreviewAccept))
            await pom1.push("agent7", CallEvent(call_id="p1", event="answered"))
            await pom1.push("agent7", CallEvent(call_id="p1", event="released"))
            await pom1.wait_for(lambda f: isinstance(f, WrapUp) and f.call_id == "p1")
            # The last OK may still be on its way to the bot; what the manager received is the record.
            assert [f.call_id for f in pom1.received if isinstance(f, WrapUp)] == ["c1", "p1"]
            assert bot.stats.calls_answered == 2 and bot.stats.previews_accepted == 1 and bot.stats.wrapups >= 1
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner


async def test_bot_waits_for_pom_available_before_acting(managers: tuple[FakeManager, FakeManager]) -> None:
    pom1, _ = managers
    async with _client([("127.0.0.1", pom1.port)]) as client:
        bot = BotAgent(client, BotSettings(talk_s=0.01, wrap_s=0.01))
        runner = asyncio.create_task(bot.run())
        try:
            await pom1.wait_for(lambda f: isinstance(f, Ready))
            await pom1.push("agent7", PomNotAvailable(zone="zone1", reason="master lost"))
            await pom1.push("agent7", CallEvent(call_id="c1", event="offered"))
            await asyncio.sleep(0.1)
            assert not any(isinstance(f, CallEvent) for f in pom1.received)
            await pom1.push("agent7", PomAvailable(zone="zone1", master="pom1", epoch=2))
            await pom1.wait_for(lambda f: isinstance(f, WrapUp))
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner


async def _until(check: Callable[[], bool], what: str, within_s: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def test_bot_keeps_its_call_across_a_failover_and_finishes_it(
    managers: tuple[FakeManager, FakeManager],
) -> None:
    """The master (pom1) dies while the bot is Talking; at the new master (pom2) the bot reports Talking on its
    call and its job (not Idle: that would be a Desktop Error), logs in without JOB_ATTACH/READY (the manager
    kept them), then releases the same call and wraps it up there. The talk time ends during the gap: the
    release waits for POM_AVAILABLE."""
    pom1, pom2 = managers
    pom2.takeover["agent7"] = AgentStateFrame(logged_in=True, ready=True, call_state=CallState.TALKING,
                                              job_id="job1", call_id="c1")
    async with _client([("127.0.0.1", pom1.port), ("127.0.0.1", pom2.port)]) as client:
        bot = BotAgent(client, BotSettings(talk_s=0.3, wrap_s=0.02, completion_code="SALE", job_id="job1"))
        runner = asyncio.create_task(bot.run())
        try:
            await pom1.wait_for(lambda f: isinstance(f, Ready))
            await pom1.push("agent7", CallEvent(call_id="c1", event="offered"))
            await pom1.wait_for(lambda f: isinstance(f, CallEvent) and f.event == "answered")
            await _until(lambda: bot.call_state is CallState.TALKING, "the bot Talking")
            await pom1.stop()
            report = await pom2.wait_for(lambda f: isinstance(f, StateReport))
            assert report == StateReport(req=900, call_state=CallState.TALKING, call_id="c1", job_id="job1")
            released = await pom2.wait_for(lambda f: isinstance(f, CallEvent) and f.event == "released")
            assert isinstance(released, CallEvent) and released.call_id == "c1"
            wrap = await pom2.wait_for(lambda f: isinstance(f, WrapUp))
            assert isinstance(wrap, WrapUp) and (wrap.call_id, wrap.completion_code) == ("c1", "SALE")
            # nothing the manager kept was asked for again, and the call ran in order at the new master
            assert [type(f) for f in pom2.received if not isinstance(f, Heartbeat)] == [
                Login, StateReport, CallEvent, WrapUp]
            assert bot.stats.calls_answered == 1 and bot.stats.calls_released == 1 and bot.stats.refused == 0
            await _until(lambda: bot.call_state is CallState.IDLE, "the bot Idle")
            assert bot.report() == (CallState.IDLE, None, "job1")
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner


async def test_bot_follows_the_managers_account_after_a_failover(
    managers: tuple[FakeManager, FakeManager],
) -> None:
    """The new master's account wins where the desktop could not know: a call the takeover ended is dropped
    and an agent the takeover detached from its job attaches again; a dial answered during the gap (the manager
    says Talking, no CALL_EVENT) is talked, released and wrapped up."""
    pom1, pom2 = managers
    pom2.takeover["agent7"] = AgentStateFrame(logged_in=True, ready=True, call_state=CallState.IDLE)
    async with _client([("127.0.0.1", pom1.port), ("127.0.0.1", pom2.port)]) as client:
        bot = BotAgent(client, BotSettings(talk_s=0.05, wrap_s=0.02, completion_code="SALE", job_id="job1"))
        runner = asyncio.create_task(bot.run())
        try:
            await pom1.wait_for(lambda f: isinstance(f, Ready))
            await pom1.push("agent7", CallEvent(call_id="d1", event="dial_started"))
            await _until(lambda: bot.call_id == "d1", "the bot Dialing d1")
            await pom1.stop()
            report = await pom2.wait_for(lambda f: isinstance(f, StateReport))
            assert isinstance(report, StateReport) and (report.call_state, report.call_id) == (CallState.DIALING, "d1")
            attach = await pom2.wait_for(lambda f: isinstance(f, JobAttach))  # Idle, no job: attaches again
            assert isinstance(attach, JobAttach) and attach.job_id == "job1"
            assert bot.call_id is None and not any(isinstance(f, Ready) for f in pom2.received)  # still ready
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    # a dial answered during the gap: the manager says Talking on the bot's call, the bot talks and wraps up
    pom3 = FakeManager("pom3")
    await pom3.start()
    pom3.takeover["agent7"] = AgentStateFrame(logged_in=True, ready=True, call_state=CallState.TALKING,
                                              job_id="job1", call_id="d2")
    try:
        async with _client([("127.0.0.1", pom2.port), ("127.0.0.1", pom3.port)]) as client:
            bot = BotAgent(client, BotSettings(talk_s=0.05, wrap_s=0.02, completion_code="SALE", job_id="job1"))
            runner = asyncio.create_task(bot.run())
            try:
                await pom2.wait_for(lambda f: isinstance(f, Ready))
                await pom2.push("agent7", CallEvent(call_id="d2", event="dial_started"))
                await _until(lambda: bot.call_id == "d2", "the bot Dialing d2")
                await pom2.stop()
                wrap = await pom3.wait_for(lambda f: isinstance(f, WrapUp))
                assert isinstance(wrap, WrapUp) and wrap.call_id == "d2"
                assert [(f.call_id, f.event) for f in pom3.received if isinstance(f, CallEvent)] == [("d2", "released")]
                assert bot.stats.calls_answered == 1
            finally:
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner
    finally:
        await pom3.stop()


def test_bot_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="talk_s"):
        BotSettings(talk_s=-1)
