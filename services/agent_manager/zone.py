"""One zone under one master term of the Agent Manager: the takeover first (:mod:`.takeover`: plan -> persist ->
announce), then the platform's call events (:mod:`.commands`) while the desktops' logins and requests are served
(:mod:`.desktops`); a zone reset on the administrator's "Save and Apply" (:mod:`.reset`). Every change is persisted
in ``agents`` under the zone lease's fence (:mod:`.zone_state`), through the term's ports.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from pom_ha.desktop.protocol import Login, StateReport, ToManager
from pom_ha.domain.takeover import AgentRecord
from pom_ha.ha.ports import TermPorts
from services.agent_manager.commands import CommandLoop
from services.agent_manager.desktops import Desktops
from services.agent_manager.reset import reset_zone
from services.agent_manager.session import Session
from services.agent_manager.takeover import Takeover
from services.agent_manager.zone_state import DesktopSettings, ZoneState, state_frame

__all__ = ["AgentRecord", "DesktopSettings", "ZoneRuntime", "state_frame"]


class ZoneRuntime(ZoneState):
    def __init__(self, ports: TermPorts, desktop: DesktopSettings | None = None, *,
                 lease_acquired_at: Callable[[], datetime | None] = lambda: None) -> None:
        super().__init__(ports, desktop)
        self.desktops = Desktops(self)
        self.takeover = Takeover(self, self.desktops, lease_acquired_at)
        self.commands = CommandLoop(self)

    async def run(self) -> None:
        try:
            await self.takeover.run()
            await self.commands.requeue()
            await self.commands.run()
        finally:
            self.available = False
            self.desktops.close()  # nothing of an ended term may reach a desktop; it reconnects elsewhere

    # ---- what the daemon and the zone configuration ask of the zone -----------------------------------------
    async def login(self, session: Session, frame: Login) -> None:
        await self.desktops.login(session, frame)

    async def reset(self, reason: Any, detail: str, *, keep_closed: bool) -> int | None:
        return await reset_zone(self, reason, detail, keep_closed=keep_closed)

    def reopen(self) -> None:
        self.resetting = False

    # a logged-in session is attached to the zone's Desktops (these are for callers that hold the runtime)
    async def request(self, session: Session, frame: ToManager) -> None:
        await self.desktops.request(session, frame)

    def on_state_report(self, session: Session, frame: StateReport) -> None:
        self.desktops.on_state_report(session, frame)

    def session_closed(self, session: Session) -> None:
        self.desktops.session_closed(session)
