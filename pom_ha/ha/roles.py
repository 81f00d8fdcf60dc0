"""Role kinds and the two independent state axes of an elected role: role state and connection state.

* :class:`SingletonRole` — one master per deployment (Common CD, Rule Engine): lease scope ``''``.
* :class:`ZoneRole` — one master per zone (Zone Director, Agent Manager): lease scope = zone name; one
  daemon may hold several zones, each with its own lease and epoch.
* :class:`PoolMember` — every instance RUNNING (Campaign Manager): no lease, a member row, and work items
  handed out with an epoch per assignment (:mod:`pom_ha.ha.assignments`).

Connection state is kept apart from role state, as kazoo does: a MASTER whose store connection is
SUSPENDED is not assumed to be master (``is_master`` is False) until a renewal is confirmed again, and it
demotes at its lease deadline if none is.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True)
class SingletonRole:
    service: str

    @property
    def scope(self) -> str:
        return ""

    @property
    def label(self) -> str:
        return self.service


@dataclass(frozen=True)
class ZoneRole:
    service: str
    zone: str

    def __post_init__(self) -> None:
        if not self.zone:
            raise ValueError("a zone role needs a zone name (use SingletonRole for scope '')")

    @property
    def scope(self) -> str:
        return self.zone

    @property
    def label(self) -> str:
        return f"{self.service}/{self.zone}"


@dataclass(frozen=True)
class PoolMember:
    service: str

    @property
    def label(self) -> str:
        return self.service


ElectedRole = SingletonRole | ZoneRole
RoleKind = SingletonRole | ZoneRole | PoolMember


class RoleState(Enum):
    DORMANT = "DORMANT"
    MASTER = "MASTER"
    STOPPED = "STOPPED"


class ConnectionState(Enum):
    """The role's view of its status-store connection (kazoo: CONNECTED / SUSPENDED / LOST)."""

    CONNECTING = "CONNECTING"  # no call has succeeded yet
    CONNECTED = "CONNECTED"  # the last call succeeded
    SUSPENDED = "SUSPENDED"  # the last call failed; a lease we hold may still be valid
    LOST = "LOST"  # calls kept failing past our lease deadline: whatever we held is gone
