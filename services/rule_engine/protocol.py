"""Requests the Rule Engine accepts, checked field by field, and the replies it sends.

A request that breaks the protocol (wrong version, unknown type, a field of the wrong type) raises
:class:`ProtocolError`; the server answers ERROR and closes that connection. A well-formed request about a
contact that cannot be dialed as given (a phone that is not E.164, an unknown time zone) is not a protocol
error: it gets a VERDICT refusing the contact with the reason (``allowed`` false, ``retry_at`` null; code
INVALID_NUMBER for a bad phone, null for a bad zone), so one bad row never costs a CM its connection.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pom_ha.clients.rule_engine import PROTOCOL_VERSION, Req, Verdict
from pom_ha.domain.attempts import CompletionCode, ContactHistory
from pom_ha.domain.contacts import Contact, ContactRejected, normalize_phone
from pom_ha.domain.instants import as_utc
from pom_ha.domain.rules import RuleSet, RuleVerdict

MAX_TEXT = 256


class ProtocolError(ValueError):
    """A request that breaks the protocol; ``str(exc)`` is the ERROR frame's reason."""


@dataclass(frozen=True, slots=True)
class PingRequest:
    req: Req


@dataclass(frozen=True, slots=True)
class EvaluateRequest:
    req: Req
    job: str
    contact_id: str
    phone: str
    timezone: str
    history: ContactHistory
    now: datetime | None


Request = PingRequest | EvaluateRequest


def request_id(frame: Mapping[str, Any]) -> Req | None:
    """The frame's ``req`` if it is usable (an integer or a short string), else None."""
    req = frame.get("req")
    if isinstance(req, bool) or not isinstance(req, int | str):
        return None
    if isinstance(req, str) and len(req) > MAX_TEXT:
        return None
    return req


def parse_request(frame: Mapping[str, Any]) -> Request:
    if frame.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {frame.get('v')!r}; this Rule Engine speaks v{PROTOCOL_VERSION}"
        )
    req = request_id(frame)
    if req is None:
        raise ProtocolError(f"req must be an integer or a string of at most {MAX_TEXT} characters")
    kind = frame.get("type")
    if kind == "PING":
        return PingRequest(req)
    if kind != "EVALUATE":
        raise ProtocolError(f"unknown request type {kind!r}; expected EVALUATE or PING")
    contact = _object(frame, "contact")
    history = _object(frame, "history")
    dialed = history.get("dialed_attempts")
    if not isinstance(dialed, int) or isinstance(dialed, bool) or dialed < 0:
        raise ProtocolError(f"history.dialed_attempts must be a non-negative integer, got {dialed!r}")
    return EvaluateRequest(
        req=req,
        job=_text(frame, "job", "job"),
        contact_id=_text(contact, "id", "contact.id"),
        phone=_text(contact, "phone", "contact.phone"),
        timezone=_text(contact, "timezone", "contact.timezone"),
        history=ContactHistory(dialed, _instant(history.get("last_dial_at"), "history.last_dial_at"),
                               _optional_count(history.get("number_attempts"), "history.number_attempts")),
        now=_instant(frame.get("now"), "now"),
    )


def _optional_count(value: object, name: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{name} must be a non-negative integer or absent, got {value!r:.80}")
    return value


def _object(frame: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = frame.get(key)
    if not isinstance(value, Mapping):
        raise ProtocolError(f"{key} must be an object, got {value!r:.80}")
    return value


def _text(obj: Mapping[str, Any], key: str, name: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ProtocolError(f"{name} must be a string of at most {MAX_TEXT} characters, got {value!r:.80}")
    return value


def _instant(value: object, name: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"{name} must be an ISO 8601 instant with its offset, or null; got {value!r:.80}")
    try:
        return as_utc(datetime.fromisoformat(value), name)
    except ValueError as exc:
        raise ProtocolError(f"{name}: {exc}") from None


def judge(rules: RuleSet, request: EvaluateRequest, now: datetime) -> RuleVerdict:
    """The verdict on one request: contact checks first (refusals, not errors), then the rules."""
    try:
        phone = normalize_phone(request.phone)
    except ContactRejected as exc:
        return RuleVerdict(False, CompletionCode.INVALID_NUMBER, None, f"contact rejected: {exc}")
    try:
        contact = Contact.create(request.contact_id, phone, request.timezone)
    except ContactRejected as exc:
        return RuleVerdict(False, None, None, f"contact rejected: {exc}")
    return rules.evaluate(contact, request.history, request.now or now)


def verdict_frame(request: EvaluateRequest, epoch: int, verdict: RuleVerdict) -> dict[str, Any]:
    return Verdict.from_rule(request.req, epoch, verdict).to_frame()


def pong_frame(req: Req, epoch: int) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "type": "PONG", "req": req, "epoch": epoch}


def error_frame(reason: str, epoch: int, req: Req | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": "ERROR", "epoch": epoch, "reason": reason}
    if req is not None:
        frame["req"] = req
    return frame
