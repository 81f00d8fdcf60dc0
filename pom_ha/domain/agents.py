"""Agents of a zone: their call and job states, the transitions desktop and call events drive, and what an
Agent Manager takeover does to each agent (the vendor guide's Table 9).

Pure: no I/O, no clock. The Agent Manager daemon owns the sockets and the timers and asks this module what
to do.

**Normal operation.** ``apply(agent, event)`` returns the agent's next :class:`AgentSnapshot` or raises
:class:`InvalidAgentTransition` naming the agent, its state and the event. ``CALL_TRANSITIONS`` is the
whole call-state table (``PASSIVE_CALL_TRANSITIONS`` overrides it for the consulted agent of a consult or
conference, who never owns the customer call); job events are checked by ``_apply_job``. Call flow:

    Idle -offered-> Pending call -answered-> Talking -released-> Wrapup -wrap_up(code)-> Idle
    Idle -preview_offered-> Preview -preview_accept-> Dialing -answered-> Talking
    Idle -callback_offered-> Callback -callback_accept-> Dialing
    Talking <-held/retrieved-> Held;  Talking|Held -consult-> Consult -conference-> ConferenceOwner

**Failover.** ``TABLE_9`` is the guide's table, one entry per call state and column; ``after_failover``
reads it. Columns: the customer call survived the gap or not, the agent is nailed or not after the
takeover. Choices where the guide is silent, each marked in the code:

* The guide prints no column for an *unnailed* agent whose customer hung up during the gap. The unnailed
  column already ends every call (Wrapup or Idle) because the agent's voice path is gone, so it is used
  for both.
* Dialing, nailed, call not disconnected, has two cells (Talking, Wrapup): Talking when the customer
  answered the dial, Wrapup when the dial ended unanswered. A dial still ringing when the new master
  looks counts as unanswered (the daemon cancels it).
* Nuisance: a live-answered call that reached no agent is abandoned, which is what the nuisance code
  means (``pom_ha.domain.nuisance``): the Pending call row, and a dial answered during the gap by a
  customer whose agent is unnailed. Calls an agent was already talking on keep the agent's own wrap-up
  code.
* Job state: a nailed agent keeps its job state; an agent whose nailing session did not load within
  AppServerWaitTimeOut is unnailed *and* detached from its job (``resolve_nailing``); an agent unnailed
  by configuration keeps its job.
* Desktop Error: after the takeover the new master compares the state it computed with the one the desktop
  reports (``check_desktop_state``); a mismatch closes the call with DESKTOP_ERROR and forces a logout.
  This also covers a Disconnect event lost during the gap (the desktop reports the call gone).

Agents without a job keep their state, whatever the columns say.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import Enum

from pom_ha.domain.attempts import CompletionCode


class CallState(Enum):
    IDLE = "Idle"
    TALKING = "Talking"
    WRAPUP = "Wrapup"
    HELD = "Held"
    CONSULT = "Consult"
    CONFERENCE_OWNER = "ConferenceOwner"
    CONFERENCE_PASSIVE = "ConferencePassive"
    PREVIEW = "Preview"
    DIALING = "Dialing"
    CALLBACK = "Callback"
    PENDING_CALL = "Pending call"

    @property
    def display_name(self) -> str:
        return self.value


class AgentJobState(Enum):
    JOB_ATTACHED = "Job Attached"
    JOB_END = "Job End"
    PENDING_INBOUND = "Pending Inbound"
    JOB_MANUAL_INBOUND = "Job Manual Inbound"
    PENDING_MANUAL_JOB_MOVEMENT = "Pending Manual Job Movement"

    @property
    def display_name(self) -> str:
        return self.value


class CallRole(Enum):
    """An agent's part in a customer call: the owner wraps it up; the passive (consulted) agent does not."""

    OWNER = "owner"
    PASSIVE = "passive"


# Call states in which the agent is on, or about to be on, a customer call.
ON_CALL_STATES = frozenset({
    CallState.TALKING, CallState.HELD, CallState.CONSULT, CallState.CONFERENCE_OWNER,
    CallState.CONFERENCE_PASSIVE, CallState.DIALING, CallState.PENDING_CALL,
})
# Job states in which the Agent Manager may hand the agent a new call.
OFFERABLE_JOB_STATES = frozenset({AgentJobState.JOB_ATTACHED, AgentJobState.JOB_MANUAL_INBOUND})


class InvalidAgentTransition(ValueError):
    """An event the agent's current state does not allow; the message names agent, state and event."""


@dataclass(frozen=True, slots=True)
class AgentSnapshot:
    """What the Agent Manager knows about one logged-in (or logged-out) agent."""

    agent_id: str
    zone: str
    logged_in: bool = False
    ready: bool = False
    call_state: CallState = CallState.IDLE
    job_state: AgentJobState | None = None
    job_id: str | None = None
    call_id: str | None = None
    role: CallRole | None = None

    def __post_init__(self) -> None:
        if (self.job_state is None) != (self.job_id is None):
            raise ValueError(f"agent {self.agent_id}: job_state and job_id go together")
        if not self.logged_in and (self.call_state is not CallState.IDLE or self.job_id is not None):
            raise ValueError(f"agent {self.agent_id}: a logged-out agent is Idle with no job")
        if self.call_state in ON_CALL_STATES and (self.call_id is None or self.role is None):
            raise ValueError(f"agent {self.agent_id}: {self.call_state.value} needs a call_id and a role")

    def describe(self) -> str:
        if not self.logged_in:
            return f"agent {self.agent_id} logged out"
        job = f"{self.job_state.value} {self.job_id}" if self.job_state else "no job"
        role = f" ({self.role.value})" if self.role is CallRole.PASSIVE else ""
        return f"agent {self.agent_id} {self.call_state.value}{role}, {job}, {'ready' if self.ready else 'not ready'}"


# ---- events ----------------------------------------------------------------------------------------------
class EventKind(Enum):
    LOGIN = "login"
    LOGOUT = "logout"
    READY = "ready"
    NOT_READY = "not_ready"
    JOB_ATTACH = "job_attach"
    JOB_END = "job_end"
    JOB_DETACH = "job_detach"
    INBOUND_REQUESTED = "inbound_requested"
    INBOUND_STARTED = "inbound_started"
    INBOUND_ENDED = "inbound_ended"
    JOB_MOVE_REQUESTED = "job_move_requested"
    PREVIEW_OFFERED = "preview_offered"
    PREVIEW_ACCEPT = "preview_accept"
    PREVIEW_CANCEL = "preview_cancel"
    CALLBACK_OFFERED = "callback_offered"
    CALLBACK_ACCEPT = "callback_accept"
    CALLBACK_CANCEL = "callback_cancel"
    DIAL_STARTED = "dial_started"
    OFFERED = "offered"
    ANSWERED = "answered"
    HELD = "held"
    RETRIEVED = "retrieved"
    CONSULT = "consult"
    CONSULT_JOINED = "consult_joined"
    CONSULT_ENDED = "consult_ended"
    CONFERENCE = "conference"
    RELEASED = "released"
    WRAP_UP = "wrap_up"


JOB_EVENTS = frozenset({
    EventKind.JOB_ATTACH, EventKind.JOB_END, EventKind.JOB_DETACH, EventKind.INBOUND_REQUESTED,
    EventKind.INBOUND_STARTED, EventKind.INBOUND_ENDED, EventKind.JOB_MOVE_REQUESTED,
})
# Call events that start a customer call (and so need a call_id) on an agent the job may offer calls to.
_CALL_STARTERS = frozenset({
    EventKind.PREVIEW_OFFERED, EventKind.CALLBACK_OFFERED, EventKind.DIAL_STARTED, EventKind.OFFERED,
    EventKind.CONSULT_JOINED,
})


@dataclass(frozen=True, slots=True)
class AgentEvent:
    """One desktop or call event. ``job_id`` goes with job_attach (and job_move_requested: the target job);
    ``call_id`` with the events that start a call; ``completion_code`` with wrap_up."""

    kind: EventKind
    job_id: str | None = None
    call_id: str | None = None
    completion_code: str | None = None


_S, _K = CallState, EventKind

# (call state, event) -> next call state, for the owner of the call (and for agents with no call).
CALL_TRANSITIONS: dict[tuple[CallState, EventKind], CallState] = {
    (_S.IDLE, _K.PREVIEW_OFFERED): _S.PREVIEW,
    (_S.PREVIEW, _K.PREVIEW_ACCEPT): _S.DIALING,
    (_S.PREVIEW, _K.PREVIEW_CANCEL): _S.IDLE,
    (_S.IDLE, _K.CALLBACK_OFFERED): _S.CALLBACK,
    (_S.CALLBACK, _K.CALLBACK_ACCEPT): _S.DIALING,
    (_S.CALLBACK, _K.CALLBACK_CANCEL): _S.IDLE,
    (_S.IDLE, _K.DIAL_STARTED): _S.DIALING,
    (_S.IDLE, _K.OFFERED): _S.PENDING_CALL,
    (_S.PENDING_CALL, _K.ANSWERED): _S.TALKING,
    (_S.DIALING, _K.ANSWERED): _S.TALKING,
    (_S.TALKING, _K.HELD): _S.HELD,
    (_S.HELD, _K.RETRIEVED): _S.TALKING,
    (_S.TALKING, _K.CONSULT): _S.CONSULT,
    (_S.HELD, _K.CONSULT): _S.CONSULT,
    (_S.IDLE, _K.CONSULT_JOINED): _S.CONSULT,
    (_S.CONSULT, _K.CONSULT_ENDED): _S.TALKING,
    (_S.CONSULT, _K.CONFERENCE): _S.CONFERENCE_OWNER,
    # The customer hung up (or the dial failed): the owner disposes of the call in Wrapup. A caller who
    # hangs up before the agent answers leaves nothing to dispose of (the CM codes it nuisance).
    (_S.PENDING_CALL, _K.RELEASED): _S.IDLE,
    (_S.DIALING, _K.RELEASED): _S.WRAPUP,
    (_S.TALKING, _K.RELEASED): _S.WRAPUP,
    (_S.HELD, _K.RELEASED): _S.WRAPUP,
    (_S.CONSULT, _K.RELEASED): _S.WRAPUP,
    (_S.CONFERENCE_OWNER, _K.RELEASED): _S.WRAPUP,
    (_S.WRAPUP, _K.WRAP_UP): _S.IDLE,
}
# The consulted agent's table where it differs: it leaves the call to Idle, with nothing to wrap up.
PASSIVE_CALL_TRANSITIONS: dict[tuple[CallState, EventKind], CallState] = {
    (_S.CONSULT, _K.CONSULT_ENDED): _S.IDLE,
    (_S.CONSULT, _K.CONFERENCE): _S.CONFERENCE_PASSIVE,
    (_S.CONSULT, _K.RELEASED): _S.IDLE,
    (_S.CONFERENCE_PASSIVE, _K.RELEASED): _S.IDLE,
}
# What an agent detached from its job by a takeover may still do: dispose of the call or offer it had.
DETACHED_EVENTS = frozenset({_K.WRAP_UP, _K.PREVIEW_CANCEL, _K.CALLBACK_CANCEL, _K.RELEASED})
# Events that make no sense for the passive agent (it holds no customer leg of its own).
_NOT_FOR_PASSIVE = frozenset({_K.HELD, _K.RETRIEVED, _K.CONSULT})


def _refuse(agent: AgentSnapshot, event: AgentEvent, why: str) -> InvalidAgentTransition:
    return InvalidAgentTransition(f"{agent.describe()}: cannot {event.kind.value}: {why}")


def apply(agent: AgentSnapshot, event: AgentEvent) -> AgentSnapshot:
    """The agent after ``event``; raises :class:`InvalidAgentTransition` if its state does not allow it."""
    kind = event.kind
    if kind is _K.LOGIN:
        if agent.logged_in:
            raise _refuse(agent, event, "already logged in")
        return replace(agent, logged_in=True, ready=False)
    if not agent.logged_in:
        raise _refuse(agent, event, "not logged in")
    if kind is _K.LOGOUT:
        if agent.call_state is not _S.IDLE:
            raise _refuse(agent, event, f"finish the {agent.call_state.value} call first")
        return AgentSnapshot(agent.agent_id, agent.zone)
    if kind in (_K.READY, _K.NOT_READY):
        return replace(agent, ready=kind is _K.READY)
    if kind in JOB_EVENTS:
        return _apply_job(agent, event)
    return _apply_call(agent, event)


def _apply_job(agent: AgentSnapshot, event: AgentEvent) -> AgentSnapshot:
    kind, js = event.kind, agent.job_state
    J = AgentJobState
    if kind is _K.JOB_ATTACH:
        if not event.job_id:
            raise _refuse(agent, event, "job_attach needs a job_id")
        if js is not None and js is not J.PENDING_MANUAL_JOB_MOVEMENT:
            raise _refuse(agent, event, "detach from the current job first")
        if agent.call_state is not _S.IDLE:
            raise _refuse(agent, event, f"finish the {agent.call_state.value} call first")
        return replace(agent, job_state=J.JOB_ATTACHED, job_id=event.job_id)
    if js is None:
        raise _refuse(agent, event, "not attached to a job")
    if kind is _K.JOB_DETACH:
        if agent.call_state is not _S.IDLE:
            raise _refuse(agent, event, f"finish the {agent.call_state.value} call first")
        return replace(agent, job_state=None, job_id=None)
    allowed: dict[tuple[EventKind, AgentJobState], AgentJobState] = {
        (_K.JOB_END, J.JOB_ATTACHED): J.JOB_END,
        (_K.JOB_END, J.PENDING_INBOUND): J.JOB_END,
        (_K.INBOUND_REQUESTED, J.JOB_ATTACHED): J.PENDING_INBOUND,
        (_K.INBOUND_STARTED, J.PENDING_INBOUND): J.JOB_MANUAL_INBOUND,
        (_K.INBOUND_ENDED, J.JOB_MANUAL_INBOUND): J.JOB_ATTACHED,
        (_K.JOB_MOVE_REQUESTED, J.JOB_ATTACHED): J.PENDING_MANUAL_JOB_MOVEMENT,
        (_K.JOB_MOVE_REQUESTED, J.JOB_END): J.PENDING_MANUAL_JOB_MOVEMENT,
    }
    nxt = allowed.get((kind, js))
    if nxt is None:
        raise _refuse(agent, event, f"not allowed in job state {js.value}")
    if kind is _K.INBOUND_STARTED and agent.call_state is not _S.IDLE:
        raise _refuse(agent, event, f"finish the {agent.call_state.value} call first")
    return replace(agent, job_state=nxt)


def _apply_call(agent: AgentSnapshot, event: AgentEvent) -> AgentSnapshot:
    kind, state = event.kind, agent.call_state
    if agent.job_state is None and kind not in DETACHED_EVENTS:
        raise _refuse(agent, event, "not attached to a job")
    passive = agent.role is CallRole.PASSIVE
    if passive and kind in _NOT_FOR_PASSIVE:
        raise _refuse(agent, event, "the consulted agent does not own the customer call")
    nxt = (PASSIVE_CALL_TRANSITIONS.get((state, kind)) if passive else None) or CALL_TRANSITIONS.get((state, kind))
    if nxt is None:
        raise _refuse(agent, event, f"not allowed in call state {state.value}")
    if kind in _CALL_STARTERS:
        if not event.call_id:
            raise _refuse(agent, event, f"{kind.value} needs a call_id")
        if kind is not _K.CONSULT_JOINED and not agent.ready:
            raise _refuse(agent, event, "agent is not ready")
        js = agent.job_state
        if kind is not _K.CONSULT_JOINED and (js is None or js not in OFFERABLE_JOB_STATES):
            raise _refuse(agent, event, f"job state {js.value if js else None} takes no new calls")
        role = CallRole.PASSIVE if kind is _K.CONSULT_JOINED else CallRole.OWNER
        return replace(agent, call_state=nxt, call_id=event.call_id, role=role)
    if kind is _K.WRAP_UP and not event.completion_code:
        raise _refuse(agent, event, "wrap_up needs a completion code")
    if nxt is _S.IDLE:
        return replace(agent, call_state=nxt, call_id=None, role=None)
    # Wrapup still refers to the call being disposed of.
    return replace(agent, call_state=nxt)


# ---- failover: Table 9 ----------------------------------------------------------------------------------
class Column(Enum):
    """Table 9's three columns of states after the failover."""

    KEPT_NAILED = "customer call not disconnected during failover, nailed"
    KEPT_UNNAILED = "customer call not disconnected during failover, unnailed"
    DROPPED_NAILED = "customer call disconnected during failover, nailed"


@dataclass(frozen=True, slots=True)
class ByRole:
    """A cell that differs for the call's owner and the consulted (passive) agent."""

    owner: CallState
    passive: CallState


@dataclass(frozen=True, slots=True)
class ByDialResult:
    """A cell that depends on whether the customer answered the dial during the gap."""

    answered: CallState
    unanswered: CallState


Cell = CallState | ByRole | ByDialResult

_KN, _KU, _DN = Column.KEPT_NAILED, Column.KEPT_UNNAILED, Column.DROPPED_NAILED

# Table 9, row by row, as the guide prints it (including ConferencePassive -> Preview when the call was
# disconnected and the agent is nailed).
TABLE_9: dict[CallState, dict[Column, Cell]] = {
    _S.IDLE: {_KN: _S.IDLE, _KU: _S.IDLE, _DN: _S.IDLE},
    _S.TALKING: {_KN: _S.TALKING, _KU: _S.WRAPUP, _DN: _S.WRAPUP},
    _S.WRAPUP: {_KN: _S.WRAPUP, _KU: _S.WRAPUP, _DN: _S.WRAPUP},
    _S.HELD: {_KN: _S.HELD, _KU: _S.WRAPUP, _DN: _S.WRAPUP},
    _S.CONSULT: {
        _KN: _S.CONSULT,
        _KU: ByRole(owner=_S.WRAPUP, passive=_S.IDLE),
        _DN: ByRole(owner=_S.WRAPUP, passive=_S.IDLE),
    },
    _S.CONFERENCE_OWNER: {_KN: _S.CONFERENCE_OWNER, _KU: _S.WRAPUP, _DN: _S.WRAPUP},
    _S.CONFERENCE_PASSIVE: {_KN: _S.CONFERENCE_PASSIVE, _KU: _S.IDLE, _DN: _S.PREVIEW},
    _S.PREVIEW: {_KN: _S.PREVIEW, _KU: _S.IDLE, _DN: _S.PREVIEW},
    _S.DIALING: {_KN: ByDialResult(answered=_S.TALKING, unanswered=_S.WRAPUP), _KU: _S.WRAPUP, _DN: _S.WRAPUP},
    _S.CALLBACK: {_KN: _S.CALLBACK, _KU: _S.CALLBACK, _DN: _S.CALLBACK},
    _S.PENDING_CALL: {_KN: _S.IDLE, _KU: _S.IDLE, _DN: _S.IDLE},
}


def column_for(*, nailed: bool, call_kept: bool) -> Column:
    """The Table 9 column; an unnailed agent whose call dropped reads the unnailed column (see module doc)."""
    if not nailed:
        return Column.KEPT_UNNAILED
    return Column.KEPT_NAILED if call_kept else Column.DROPPED_NAILED


class CallEffect(Enum):
    """What happens to the agent's customer call."""

    NONE = "no customer call"
    CONTINUES = "call continues with the agent"
    DISCONNECT_REPORTED = "disconnected during the gap; the desktop is told and the agent wraps up"
    RELEASED = "the agent lost its voice path; the call is released"
    NOT_CONNECTED = "answered but never reached the agent"


@dataclass(frozen=True, slots=True)
class FailoverOutcome:
    """One agent after a takeover. ``completion_code`` is the code the system closes the call with (NUISANCE
    or DESKTOP_ERROR), or None when the call continues or the agent disposes of it in Wrapup."""

    before: AgentSnapshot
    after: AgentSnapshot
    column: Column | None
    call_effect: CallEffect
    completion_code: CompletionCode | None = None
    force_logout: bool = False
    job_detached: bool = False

    @property
    def keeps_state(self) -> bool:
        return self.after == self.before

    def describe(self) -> str:
        parts = [f"{self.before.describe()} -> {self.after.call_state.value}"]
        if self.column is None:
            parts.append("(no job: state kept)")
        if self.call_effect is not CallEffect.NONE:
            parts.append(self.call_effect.value)
        if self.completion_code is not None:
            parts.append(f"call closed {self.completion_code.name}")
        if self.job_detached:
            parts.append("detached from its job")
        if self.force_logout:
            parts.append("logged out")
        return "; ".join(parts)


def _cell_state(cell: Cell, agent: AgentSnapshot, dial_answered: bool) -> CallState:
    if isinstance(cell, ByRole):
        return cell.passive if agent.role is CallRole.PASSIVE else cell.owner
    if isinstance(cell, ByDialResult):
        return cell.answered if dial_answered else cell.unanswered
    return cell


def _call_effect(before: CallState, column: Column, dial_answered: bool) -> CallEffect:
    if before is _S.PENDING_CALL:
        return CallEffect.NOT_CONNECTED
    if before not in ON_CALL_STATES:
        return CallEffect.NONE
    if before is _S.DIALING and column is Column.KEPT_NAILED:
        return CallEffect.CONTINUES if dial_answered else CallEffect.DISCONNECT_REPORTED
    if column is Column.KEPT_NAILED:
        return CallEffect.CONTINUES
    if column is Column.KEPT_UNNAILED:
        return CallEffect.RELEASED
    return CallEffect.DISCONNECT_REPORTED


def after_failover(
    agent: AgentSnapshot,
    nailed: bool,
    *,
    call_kept: bool = True,
    dial_answered: bool = False,
    detach_job: bool = False,
    desktop_state: CallState | None = None,
    desktop_call_id: str | None = None,
) -> FailoverOutcome:
    """What Table 9 does to ``agent`` when a new master takes its zone over.

    ``nailed``: the agent's nail state after the takeover (see ``resolve_nailing``). ``call_kept``: the
    customer call was not disconnected during the gap. ``dial_answered``: a Dialing agent's customer
    answered. ``detach_job``: the agent's nailing session missed AppServerWaitTimeOut. ``desktop_state``: the
    state (and ``desktop_call_id`` the call) the desktop reported in the post-takeover check, if it has
    answered (a mismatch closes the call with DESKTOP_ERROR and logs the agent out).
    """
    if not agent.logged_in or agent.job_state is None:
        outcome = FailoverOutcome(agent, agent, None, CallEffect.NONE)
        return _with_desktop_check(outcome, desktop_state, desktop_call_id)
    column = column_for(nailed=nailed, call_kept=call_kept)
    new_state = _cell_state(TABLE_9[agent.call_state][column], agent, dial_answered)
    effect = _call_effect(agent.call_state, column, dial_answered)
    code: CompletionCode | None = None
    if effect is CallEffect.NOT_CONNECTED or (
        agent.call_state is _S.DIALING and dial_answered and column is Column.KEPT_UNNAILED
    ):
        code = CompletionCode.NUISANCE
    if new_state is _S.IDLE:
        after = replace(agent, call_state=new_state, call_id=None, role=None)
    else:
        # Only a consulted agent still on the call stays passive; every other state is the agent's own.
        role = agent.role if new_state in (_S.CONSULT, _S.CONFERENCE_PASSIVE) else CallRole.OWNER
        after = replace(agent, call_state=new_state, role=role)
    if detach_job:
        # A call it still has (Wrapup, Callback) is disposed of without the job: see DETACHED_EVENTS.
        after = replace(after, job_state=None, job_id=None)
    outcome = FailoverOutcome(agent, after, column, effect, code, job_detached=detach_job)
    return _with_desktop_check(outcome, desktop_state, desktop_call_id)


def _with_desktop_check(
    outcome: FailoverOutcome, desktop_state: CallState | None, desktop_call_id: str | None
) -> FailoverOutcome:
    if desktop_state is None:
        return outcome
    check = check_desktop_state(outcome.after, desktop_state, desktop_call_id)
    if check.matches:
        return outcome
    logged_out = AgentSnapshot(outcome.after.agent_id, outcome.after.zone)
    return replace(outcome, after=logged_out, completion_code=check.completion_code, force_logout=True)


@dataclass(frozen=True, slots=True)
class DesktopCheck:
    matches: bool
    completion_code: CompletionCode | None
    force_logout: bool
    reason: str


def check_desktop_state(
    expected: AgentSnapshot, reported: CallState, reported_call_id: str | None = None
) -> DesktopCheck:
    """The new master's check of one agent against its desktop. The states must be equal, and so must the
    call ids when both sides name one. A mismatch forces a logout and, if the agent had a call (by either
    account), closes it with DESKTOP_ERROR."""
    same_call = reported_call_id is None or expected.call_id is None or reported_call_id == expected.call_id
    if expected.call_state is reported and same_call:
        return DesktopCheck(True, None, False, f"agent {expected.agent_id}: desktop agrees ({reported.value})")
    had_call = expected.call_id is not None or reported in ON_CALL_STATES or reported is _S.WRAPUP
    says = f"{reported.value}" + ("" if same_call else f" on call {reported_call_id}")
    return DesktopCheck(
        False,
        CompletionCode.DESKTOP_ERROR if had_call else None,
        True,
        f"agent {expected.agent_id}: manager says {expected.call_state.value}"
        f"{'' if same_call else f' on call {expected.call_id}'}, desktop says {says}",
    )


# ---- workspaces: the agent SDK connection breaks ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SdkLossOutcome:
    completion_code: CompletionCode | None
    logout_now: bool
    logout_after_call: bool


def after_sdk_connection_lost(agent: AgentSnapshot) -> SdkLossOutcome:
    """Workspaces deployment: the agent SDK's connection to the Agent Manager broke. Every agent is logged
    out; an agent with a call is logged out once the call is over, and the call is closed DESKTOP_ERROR."""
    if not agent.logged_in:
        return SdkLossOutcome(None, logout_now=False, logout_after_call=False)
    if agent.call_id is None:
        return SdkLossOutcome(None, logout_now=True, logout_after_call=False)
    busy = agent.call_state in ON_CALL_STATES and agent.call_state is not _S.PENDING_CALL
    return SdkLossOutcome(CompletionCode.DESKTOP_ERROR, logout_now=not busy, logout_after_call=busy)


# ---- AppServerWaitTimeOut ----------------------------------------------------------------------------
APP_SERVER_WAIT_TIMEOUT_KEY = "AppServerWaitTimeOut"
DEFAULT_APP_SERVER_WAIT_TIMEOUT_S = 30.0


def app_server_wait_timeout_s(raw: str | None) -> float:
    """The pim_config value (seconds, default 30); raises ValueError naming the key for a bad value."""
    if raw is None or raw.strip() == "":
        return DEFAULT_APP_SERVER_WAIT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{APP_SERVER_WAIT_TIMEOUT_KEY}: must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{APP_SERVER_WAIT_TIMEOUT_KEY}: must be >= 0 seconds, got {raw!r}")
    return value


@dataclass(frozen=True, slots=True)
class NailResolution:
    agent_id: str
    nailed: bool
    detach_job: bool
    reason: str


def resolve_nailing(
    nailed_before: Mapping[str, bool],
    loaded_at_s: Mapping[str, float],
    takeover_at_s: float,
    timeout_s: float,
) -> dict[str, NailResolution]:
    """Apply AppServerWaitTimeOut. ``nailed_before``: agent -> nailed when the old master failed;
    ``loaded_at_s``: agent -> monotonic time its nailing session was reported by the application servers.
    A nailed agent whose session loaded at or before ``takeover_at_s + timeout_s`` stays nailed; any
    other nailed agent is unnailed and detached from its job. Unnailed agents stay as they were."""
    deadline = takeover_at_s + timeout_s
    out: dict[str, NailResolution] = {}
    for agent_id, was_nailed in nailed_before.items():
        if not was_nailed:
            out[agent_id] = NailResolution(agent_id, False, False, "not nailed before the failover")
            continue
        loaded = loaded_at_s.get(agent_id)
        if loaded is not None and loaded <= deadline:
            out[agent_id] = NailResolution(agent_id, True, False, "nailing session loaded")
        else:
            why = "never reported" if loaded is None else f"reported {loaded - takeover_at_s:.3f}s after takeover"
            out[agent_id] = NailResolution(
                agent_id, False, True, f"nailing session {why}, timeout {timeout_s:g}s: unnailed and detached"
            )
    return out


# ---- Total HA time ----------------------------------------------------------------------------------------
def ha_time_s(
    outage_start_s: float, outage_end_s: float, logged_in_s: float, logged_out_s: float | None = None
) -> float:
    """Seconds of an Agent Manager outage (POMNotAvailable .. POMAvailable, monotonic seconds) that fall in
    one agent's login session (``logged_out_s`` None while still logged in)."""
    if outage_end_s < outage_start_s:
        raise ValueError(f"outage ends ({outage_end_s}) before it starts ({outage_start_s})")
    end = outage_end_s if logged_out_s is None else min(outage_end_s, logged_out_s)
    return max(0.0, end - max(outage_start_s, logged_in_s))


@dataclass(frozen=True, slots=True)
class AgentTimeSummary:
    """Seconds an agent spent per activity in a reporting period; ``total_ha_s`` is Agent Manager failover."""

    agent_id: str
    idle_s: float = 0.0
    talk_s: float = 0.0
    wrapup_s: float = 0.0
    not_ready_s: float = 0.0
    total_ha_s: float = 0.0
    failovers: int = 0

    def with_ha_time(self, seconds: float) -> AgentTimeSummary:
        if seconds < 0 or not math.isfinite(seconds):
            raise ValueError(f"agent {self.agent_id}: HA time must be a finite, non-negative number of seconds")
        if seconds == 0:
            return self
        return replace(self, total_ha_s=self.total_ha_s + seconds, failovers=self.failovers + 1)
