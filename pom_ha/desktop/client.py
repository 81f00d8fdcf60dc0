"""The agent desktop's side of the desktop protocol, and a bot agent that drives it (the desktop simulator's
unit of work).

``DesktopClient(addresses, agent_id, zone)`` knows every Agent Manager address. It connects to one, logs
in, sends heartbeats and watches the manager's, and when the connection is lost (broken socket, heartbeat
silence, a fatal ERROR) it reports POMNotAvailable locally, moves to the next address with a jittered
backoff and logs in again. Addresses learnt from ``LOGIN_OK.manager_addresses`` are added to its list.
Requests (``ready``, ``wrap_up``, ...) return the manager's ``OK`` or raise :class:`RequestRefused` (the
manager's ERROR) or :class:`DesktopUnavailable` (no session, or no answer in time: retriable). Every other
frame the manager sends goes to ``events``; ``STATE_QUERY`` is answered from ``state_report``. A
``FORCED_LOGOUT second_login`` ends the client (another desktop has the agent); any other forced logout
is followed by a fresh login unless ``relogin`` is false: at the same address, except after
``sdk_connection_lost`` (the workspaces scenario), which moves to the next (secondary) address first.

``BotAgent(client, BotSettings(talk_s=..., wrap_s=...))`` reads ``events`` and plays an agent: ready on
login, answers offered calls, accepts previews and callbacks, talks ``talk_s``, releases, wraps up with
``completion_code`` after ``wrap_s``. It keeps its own account of its call state (the desktop's side of
the post-takeover check) from the call events it saw and the actions it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from pom_ha.desktop.protocol import (
    AgentStateFrame,
    CallbackAccept,
    CallbackOffered,
    CallbackRequest,
    CallEvent,
    CallEventName,
    ErrorFrame,
    ForcedLogout,
    Heartbeat,
    JobAttach,
    Login,
    LoginOk,
    Logout,
    NotReady,
    Ok,
    PomAvailable,
    PomNotAvailable,
    PreviewAccept,
    PreviewCancel,
    PreviewOffered,
    ProtocolError,
    Ready,
    StateQuery,
    StateReport,
    ToDesktop,
    WrapUp,
    read_frame,
    write_frame,
)
from pom_ha.domain.agents import CallState
from pom_ha.ha.retry import Backoff

log = structlog.get_logger("pom_ha.desktop.client")
Address = tuple[str, int]
StateReporter = Callable[[], tuple[CallState, str | None, str | None]]


class DesktopError(Exception):
    retriable = False


class DesktopUnavailable(DesktopError):
    """No session with a manager, or no answer in time; the request's fate is unknown."""

    retriable = True


class RequestRefused(DesktopError):
    """The manager answered ERROR; ``error`` is its frame."""

    def __init__(self, error: ErrorFrame) -> None:
        super().__init__(f"{error.code}: {error.reason}")
        self.error = error


class _SessionEnded(Exception):
    pass


@dataclass
class DesktopSettings:
    """Timing of one desktop; heartbeats follow ``LOGIN_OK`` once logged in."""

    connect_timeout_s: float = 1.0
    reply_timeout_s: float = 2.0
    login_heartbeat_interval_ms: int = 1000
    login_heartbeat_miss_limit: int = 3
    backoff: Backoff = field(default_factory=lambda: Backoff(initial_s=0.02, max_s=0.5))


@dataclass
class DesktopStats:
    logins: int = 0
    connection_losses: int = 0
    heartbeats_sent: int = 0
    heartbeats_received: int = 0
    not_available_seen: int = 0
    available_seen: int = 0
    forced_logouts: dict[str, int] = field(default_factory=dict)
    loss_causes: dict[str, int] = field(default_factory=dict)


class DesktopClient:
    def __init__(
        self,
        addresses: Sequence[Address],
        agent_id: str,
        zone: str,
        *,
        desktop_id: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        settings: DesktopSettings | None = None,
        state_report: StateReporter | None = None,
        relogin: bool = True,
    ) -> None:
        if not addresses:
            raise ValueError("a desktop needs at least one Agent Manager address")
        self.addresses: list[Address] = list(dict.fromkeys(addresses))
        self.agent_id, self.zone = agent_id, zone
        self.desktop_id = desktop_id or f"desk-{agent_id}"
        self.ssl_context = ssl_context
        self.settings = settings or DesktopSettings()
        self.state_report = state_report or self._last_known_state
        self.relogin = relogin
        self.events: asyncio.Queue[ToDesktop] = asyncio.Queue()
        self.logged_in = asyncio.Event()
        self.available = asyncio.Event()
        self.stopped = asyncio.Event()
        self.stats = DesktopStats()
        self.session: LoginOk | None = None
        self.address: Address | None = None
        self._last_state: AgentStateFrame | None = None
        self._req = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Ok | ErrorFrame]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._index = 0
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def last_state(self) -> AgentStateFrame | None:
        """The manager's last ``AGENT_STATE`` on this desktop (None before the first)."""
        return self._last_state

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"desktop-{self.agent_id}")

    async def close(self) -> None:
        self._closing = True
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.stopped.set()

    async def _run(self) -> None:
        backoff = self.settings.backoff
        try:
            while not self._closing:
                address = self.addresses[self._index % len(self.addresses)]
                cause = "closed"
                try:
                    cause = await self._session(address)
                except (OSError, TimeoutError) as exc:
                    cause = f"connect: {type(exc).__name__}"
                except ProtocolError as exc:
                    cause = f"protocol: {exc.code}"
                except RequestRefused as exc:
                    cause = f"login refused: {exc.error.code}"
                was_logged_in = self.logged_in.is_set()
                self._lost(address, cause)
                if self._closing:
                    break
                if was_logged_in and cause == "forced logout: sdk_connection_lost":
                    self._index += 1  # workspaces: the SDK link broke; log in again at the secondary address
                    continue
                if was_logged_in and cause.startswith("forced logout"):
                    continue  # log in again at once, same manager
                if was_logged_in:
                    backoff.reset()
                self._index += 1
                await backoff.wait()
        except asyncio.CancelledError:
            self._lost(self.address, "client closed")
            raise
        finally:
            self.stopped.set()

    def _lost(self, address: Address | None, cause: str) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(DesktopUnavailable(f"connection to {address} lost: {cause}"))
        self._pending.clear()
        if self.logged_in.is_set():
            self.stats.connection_losses += 1
            key = cause.split(":")[0]
            self.stats.loss_causes[key] = self.stats.loss_causes.get(key, 0) + 1
            log.info("desktop lost its manager", agent=self.agent_id, address=address, cause=cause)
            if self.available.is_set() or cause != "client closed":
                # The desktop's own POMNotAvailable: the manager that would send it may be dead.
                self._notify_not_available(f"desktop: connection to {address} lost ({cause})")
        self.logged_in.clear()
        self.available.clear()
        self.session = None

    def _notify_not_available(self, reason: str) -> None:
        self.available.clear()
        self.stats.not_available_seen += 1
        self.events.put_nowait(PomNotAvailable(zone=self.zone, reason=reason[:2000]))

    async def _session(self, address: Address) -> str:
        host, port = address
        async with asyncio.timeout(self.settings.connect_timeout_s):
            reader, writer = await asyncio.open_connection(host, port, ssl=self.ssl_context)
        self._writer, self.address = writer, address
        req = next(self._req)
        await write_frame(writer, Login(req=req, agent_id=self.agent_id, zone=self.zone, desktop_id=self.desktop_id))
        silence_s = self.settings.login_heartbeat_interval_ms * self.settings.login_heartbeat_miss_limit / 1000
        async with asyncio.timeout(min(silence_s, self.settings.reply_timeout_s)):
            first = await read_frame(reader, "to_desktop")
        if isinstance(first, ErrorFrame):
            raise RequestRefused(first)
        if not isinstance(first, LoginOk) or first.req != req:
            raise ProtocolError("malformed", "type", f"expected LOGIN_OK for req {req}, got {first!r}")
        self._logged_in(first)
        interval_s = first.heartbeat_interval_ms / 1000
        beats = asyncio.create_task(self._heartbeats(writer, interval_s), name=f"desktop-hb-{self.agent_id}")
        try:
            return await self._read_loop(reader, interval_s * first.heartbeat_miss_limit)
        finally:
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await beats

    def _logged_in(self, ok: LoginOk) -> None:
        self.session = ok
        self.stats.logins += 1
        for text in ok.manager_addresses:
            host, _, port = text.rpartition(":")
            if host and port.isdigit() and (host, int(port)) not in self.addresses:
                self.addresses.append((host, int(port)))
        self.logged_in.set()
        self.events.put_nowait(ok)
        log.info("desktop logged in", agent=self.agent_id, master=ok.master, epoch=ok.epoch)

    async def _heartbeats(self, writer: asyncio.StreamWriter, interval_s: float) -> None:
        for seq in itertools.count():
            await write_frame(writer, Heartbeat(seq=seq))
            self.stats.heartbeats_sent += 1
            await asyncio.sleep(interval_s)

    async def _read_loop(self, reader: asyncio.StreamReader, silence_s: float) -> str:
        last_heard = time.monotonic()
        while True:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that races a frame.
                async with asyncio.timeout(silence_s):
                    frame = await read_frame(reader, "to_desktop")
            except TimeoutError:
                return f"heartbeat_timeout: nothing for {time.monotonic() - last_heard:.3f}s"
            if frame is None:
                return "closed by manager"
            last_heard = time.monotonic()
            cause = await self._dispatch(frame)
            if cause is not None:
                return cause

    async def _dispatch(self, frame: ToDesktop) -> str | None:
        if isinstance(frame, Heartbeat):
            self.stats.heartbeats_received += 1
            return None
        if isinstance(frame, Ok | ErrorFrame) and isinstance(frame.req, int) and frame.req in self._pending:
            future = self._pending.pop(frame.req)
            if not future.done():
                future.set_result(frame)
            return None
        if isinstance(frame, ErrorFrame) and frame.fatal:
            return f"fatal error: {frame.code}"
        if isinstance(frame, StateQuery):
            call_state, call_id, job_id = self.state_report()
            await self._send(StateReport(req=frame.req, call_state=call_state, call_id=call_id, job_id=job_id))
            return None
        if isinstance(frame, AgentStateFrame):
            self._last_state = frame
        elif isinstance(frame, PomAvailable):
            self.stats.available_seen += 1
            self.available.set()
        elif isinstance(frame, PomNotAvailable):
            self.stats.not_available_seen += 1
            self.available.clear()
        self.events.put_nowait(frame)
        if isinstance(frame, ForcedLogout):
            self.stats.forced_logouts[frame.reason] = self.stats.forced_logouts.get(frame.reason, 0) + 1
            if frame.reason == "second_login" or not self.relogin:
                self._closing = True
            return f"forced logout: {frame.reason}"
        return None

    def _last_known_state(self) -> tuple[CallState, str | None, str | None]:
        state = self._last_state
        if state is None:
            return CallState.IDLE, None, None
        return state.call_state, state.call_id, state.job_id

    async def _send(self, frame: Any) -> None:
        if self._writer is None:
            raise DesktopUnavailable(f"agent {self.agent_id}: no session with a manager")
        await write_frame(self._writer, frame)

    # ---- requests ---------------------------------------------------------------------------------------
    async def _request(self, model: type[Any], **fields: Any) -> Ok:
        if not self.logged_in.is_set():
            try:
                async with asyncio.timeout(self.settings.reply_timeout_s):
                    await self.logged_in.wait()
            except TimeoutError:
                raise DesktopUnavailable(f"agent {self.agent_id}: not logged in to any manager") from None
        req = next(self._req)
        future: asyncio.Future[Ok | ErrorFrame] = asyncio.get_running_loop().create_future()
        self._pending[req] = future
        try:
            await self._send(model(req=req, **fields))
            async with asyncio.timeout(self.settings.reply_timeout_s):
                reply = await future
        except (ConnectionError, OSError) as exc:
            raise DesktopUnavailable(f"agent {self.agent_id}: {model.TYPE} not sent: {exc}") from None
        except TimeoutError:
            raise DesktopUnavailable(f"agent {self.agent_id}: no answer to {model.TYPE} in time") from None
        finally:
            self._pending.pop(req, None)
        if isinstance(reply, ErrorFrame):
            raise RequestRefused(reply)
        return reply

    async def ready(self) -> Ok:
        return await self._request(Ready)

    async def not_ready(self, reason_code: str | None = None) -> Ok:
        return await self._request(NotReady, reason_code=reason_code)

    async def logout(self) -> Ok:
        return await self._request(Logout)

    async def job_attach(self, job_id: str) -> Ok:
        return await self._request(JobAttach, job_id=job_id)

    async def preview_accept(self, call_id: str) -> Ok:
        return await self._request(PreviewAccept, call_id=call_id)

    async def preview_cancel(self, call_id: str) -> Ok:
        return await self._request(PreviewCancel, call_id=call_id)

    async def callback_accept(self, call_id: str) -> Ok:
        return await self._request(CallbackAccept, call_id=call_id)

    async def call_event(self, call_id: str, event: CallEventName, consult_agent_id: str | None = None) -> Ok:
        return await self._request(CallEvent, call_id=call_id, event=event, consult_agent_id=consult_agent_id)

    async def wrap_up(self, call_id: str, completion_code: str, callback: CallbackRequest | None = None) -> Ok:
        return await self._request(WrapUp, call_id=call_id, completion_code=completion_code, callback=callback)


# ---- the bot agent -----------------------------------------------------------------------------------------
@dataclass
class BotSettings:
    """``talk_s``/``wrap_s`` are means; each call draws uniformly within ``± jitter`` of them."""

    talk_s: float = 5.0
    wrap_s: float = 2.0
    jitter: float = 0.0
    completion_code: str = "SALE"
    job_id: str | None = None
    accept_previews: bool = True

    def __post_init__(self) -> None:
        if self.talk_s < 0 or self.wrap_s < 0 or not 0 <= self.jitter <= 1:
            raise ValueError("talk_s and wrap_s must be >= 0 and jitter within 0..1")


@dataclass
class BotStats:
    calls_answered: int = 0
    calls_released: int = 0
    wrapups: int = 0
    previews_accepted: int = 0
    callbacks_accepted: int = 0
    refused: int = 0
    unavailable: int = 0


class BotAgent:
    """One simulated agent. Its call (state, call id, job) is the desktop's own account and survives a lost
    connection: a real desktop keeps its call while it reconnects to the new master, reports it in the
    ``STATE_REPORT`` and finishes it (release, wrap-up) once the zone is available again. Only a
    ``FORCED_LOGOUT`` (the manager closed the call) clears it.

    After each login the first ``AGENT_STATE`` that follows the login's ``POM_AVAILABLE`` is the manager's
    account of the agent; the bot lines up with it (``_resync``): a call the manager no longer has is dropped,
    a dial or pending call the manager saw answered is talked, a wrap-up the manager already has is wrapped
    up, an action that was lost with the connection is taken again, and an agent with no call and no job (a
    fresh login, or detached by a takeover) attaches to ``job_id`` and goes ready."""

    def __init__(self, client: DesktopClient, settings: BotSettings | None = None, rng: random.Random | None = None):
        self.client = client
        self.settings = settings or BotSettings()
        self.rng = rng or random.Random()
        self.stats = BotStats()
        self.call_state = CallState.IDLE
        self.call_id: str | None = None
        self.job_id: str | None = None
        self._timer: asyncio.Task[None] | None = None
        self._resync_pending = False  # a login happened; its manager's account of the agent is still to come
        self._announced = False  # ... and its POM_AVAILABLE has been read: the next AGENT_STATE is that account
        client.state_report = self.report

    def report(self) -> tuple[CallState, str | None, str | None]:
        return self.call_state, self.call_id, self.job_id

    def _draw(self, mean_s: float) -> float:
        spread = mean_s * self.settings.jitter
        return max(0.0, mean_s + self.rng.uniform(-spread, spread))

    async def run(self) -> None:
        """Play the agent until cancelled (or the client stops)."""
        try:
            while True:
                frame = await self.client.events.get()
                await self.on_frame(frame)
        finally:
            self._cancel_timer()

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()

    def _later(self, delay_s: float, action: Callable[[], Any]) -> None:
        """Run ``action`` after ``delay_s``; ``_timer`` stays set until the action has finished, so an action
        waiting for the zone (or lost with the connection) is known to be pending."""
        self._cancel_timer()

        async def fire() -> None:
            try:
                await asyncio.sleep(delay_s)
                await action()
            finally:
                if self._timer is asyncio.current_task():
                    self._timer = None

        self._timer = asyncio.create_task(fire(), name=f"bot-{self.client.agent_id}")

    async def _act(self, request: Callable[[], Any]) -> bool:
        # While the zone has no master the desktop cannot act: wait for POMAvailable, then try.
        await self.client.available.wait()
        try:
            await request()
        except RequestRefused as exc:
            self.stats.refused += 1
            log.info("bot request refused", agent=self.client.agent_id, error=str(exc))
            return False
        except DesktopUnavailable:
            self.stats.unavailable += 1
            return False
        return True

    def _reset(self) -> None:
        self._cancel_timer()
        self.call_state, self.call_id = CallState.IDLE, None

    async def on_frame(self, frame: ToDesktop) -> None:
        if isinstance(frame, LoginOk):
            # A new session: first login, a reconnect after a lost connection or a failover, or a login after a
            # forced logout. The call (if any) is kept: the manager's check compares it with its own account.
            self._resync_pending, self._announced = True, False
        elif isinstance(frame, PomNotAvailable):
            self._announced = False
        elif isinstance(frame, PomAvailable):
            self._announced = self._resync_pending
        elif isinstance(frame, ForcedLogout):
            self._reset()  # the manager closed the call (desktop error, zone reset, SDK link lost) and the job
            self.job_id = None
        elif isinstance(frame, AgentStateFrame):
            if self._resync_pending and self._announced:
                self._resync_pending = self._announced = False
                await self._resync(frame)
            else:
                self.job_id = frame.job_id  # the manager attaches (and detaches) agents to jobs
        elif isinstance(frame, PreviewOffered | CallbackOffered) and self.settings.accept_previews:
            callback = isinstance(frame, CallbackOffered)
            self.call_state, self.call_id = CallState.CALLBACK if callback else CallState.PREVIEW, frame.call_id
            await self._accept(frame.call_id, callback)
        elif isinstance(frame, CallEvent):
            await self._on_call_event(frame)

    async def _resync(self, am: AgentStateFrame) -> None:
        """Line up with the manager's account of the agent after a login (see the class doc)."""
        self.job_id = am.job_id
        mine = self.call_id
        if mine is not None and am.call_id is None:
            self._reset()  # e.g. a pending call the takeover closed, or the manager logged the agent out
        elif mine is not None and am.call_id == mine:
            state, pending = self.call_state, self._timer is not None
            if am.call_state is CallState.TALKING and state in (CallState.DIALING, CallState.PENDING_CALL):
                self._talking()  # answered while the desktop was away (or the answer's OK was lost)
            elif am.call_state is CallState.WRAPUP and state is not CallState.WRAPUP:
                self._wrapping()  # the release went through; a CALL_EVENT released may follow and is ignored
            elif am.call_state is CallState.PENDING_CALL and state is CallState.PENDING_CALL:
                await self._answer(mine)  # the answer was lost with the connection
            elif am.call_state in (CallState.PREVIEW, CallState.CALLBACK) and state is am.call_state:
                await self._accept(mine, state is CallState.CALLBACK)
            elif state is CallState.TALKING and not pending:
                self._later(0, self._hang_up)  # the release was lost with the connection
            elif state is CallState.WRAPUP and not pending:
                self._later(0, self._wrap_up)
        if self.call_id is None:
            await self._prepare(am.job_id, am.ready)

    async def _prepare(self, job_id: str | None, ready: bool) -> None:
        """An agent with no call: attached to the configured job and ready."""
        s = self.settings
        if s.job_id is not None and job_id is None and await self._act(lambda: self.client.job_attach(str(s.job_id))):
            self.job_id = s.job_id
        if not ready:
            await self._act(self.client.ready)

    async def _accept(self, call_id: str, callback: bool) -> None:
        if callback:
            ok = await self._act(lambda: self.client.callback_accept(call_id))
            self.stats.callbacks_accepted += ok
        else:
            ok = await self._act(lambda: self.client.preview_accept(call_id))
            self.stats.previews_accepted += ok
        if ok:
            self.call_state = CallState.DIALING
        elif self.client.logged_in.is_set() and self.call_id == call_id:
            self._reset()  # refused; an accept lost with the connection is retried after the next login

    async def _answer(self, call_id: str) -> None:
        if await self._act(lambda: self.client.call_event(call_id, "answered")):
            self._talking()

    async def _on_call_event(self, frame: CallEvent) -> None:
        if frame.event == "offered":
            self.call_state, self.call_id = CallState.PENDING_CALL, frame.call_id
            await self._answer(frame.call_id)
        elif frame.event == "dial_started":
            self.call_state, self.call_id = CallState.DIALING, frame.call_id
        elif frame.event == "answered" and frame.call_id == self.call_id:
            self._talking()
        elif frame.event == "released" and frame.call_id == self.call_id:
            if self.call_state is CallState.PENDING_CALL:
                self._reset()
            elif self.call_state is not CallState.WRAPUP:
                self._wrapping()

    def _talking(self) -> None:
        self.stats.calls_answered += 1
        self.call_state = CallState.TALKING
        self._later(self._draw(self.settings.talk_s), self._hang_up)

    async def _hang_up(self) -> None:
        call_id = self.call_id
        if call_id is not None and await self._act(lambda: self.client.call_event(call_id, "released")):
            self.stats.calls_released += 1
            self._wrapping()

    def _wrapping(self) -> None:
        self.call_state = CallState.WRAPUP
        self._later(self._draw(self.settings.wrap_s), self._wrap_up)

    async def _wrap_up(self) -> None:
        call_id = self.call_id
        if call_id is not None and await self._act(
            lambda: self.client.wrap_up(call_id, self.settings.completion_code)
        ):
            self.stats.wrapups += 1
            self.call_state, self.call_id = CallState.IDLE, None
            if self.settings.job_id is not None and self.job_id is None:
                await self._prepare(None, True)  # detached from its job by a takeover: attach again
