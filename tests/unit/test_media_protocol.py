"""Media-platform frames: every type round-trips, and a bad frame's error names the field."""

from __future__ import annotations

from typing import Any

import pytest

from pom_ha.media.protocol import (
    Accepted,
    Cancel,
    Claim,
    Claimed,
    Dial,
    ErrorFrame,
    Outcome,
    ProtocolError,
    Rejected,
    SetMode,
    StatsReply,
    StatsRequest,
    parse_client_frame,
    parse_platform_frame,
)
from pom_ha.wire import decode, encode

DIAL = Dial("job1-c7-1", "job1", "c7", 1, "+15551230007", 4, "job/job1")
OUTCOME = Outcome("job1-c7-1", "job/job1", "job1", "c7", 1, 4, "BUSY", False, 2300)


def _wire(frame: dict[str, Any]) -> dict[str, Any]:
    return decode(encode(frame)[4:])


@pytest.mark.parametrize("frame", [DIAL, Cancel("a1"), SetMode("down", drop_calls=True), StatsRequest(),
                                   Claim("job/job1", 5)])
def test_client_frames_round_trip(frame: Any) -> None:
    obj = _wire(frame.to_frame())
    assert obj["v"] == 1 and obj["type"] == frame.TYPE
    assert parse_client_frame(obj) == frame


@pytest.mark.parametrize("frame", [
    Accepted("a1"), Rejected("a1", "stale_epoch", "epoch 3 < 4"), OUTCOME, Claimed("job/job1", True, 3, 2),
    ErrorFrame("DIAL.phone: must be a non-empty string"),
    StatsReply("up", 500, 3, 9, 12, {"BUSY": 9}, {"capacity": 1}, 0, 0, 0, 0, 2),
])
def test_platform_frames_round_trip(frame: Any) -> None:
    assert parse_platform_frame(_wire(frame.to_frame())) == frame


def test_outcome_platform_lost_flag_never_goes_on_the_wire() -> None:
    lost = Outcome("a", "s", "j", "c", 1, 0, "NETWORK_FAILURE", False, 0, platform_lost=True)
    assert "platform_lost" not in lost.to_frame()


def _dial(**changes: Any) -> dict[str, Any]:
    obj = DIAL.to_frame()
    for key, value in changes.items():
        if value is None:
            obj.pop(key)
        else:
            obj[key] = value
    return obj


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        (_dial(phone=None), "DIAL.phone"),
        (_dial(phone=5551234), "DIAL.phone"),
        (_dial(attempt_no=0), "DIAL.attempt_no"),
        (_dial(epoch=True), "DIAL.epoch"),
        (_dial(epoch=-1), "DIAL.epoch"),
        (_dial(scope=""), "DIAL.scope"),
        (_dial(job="x" * 201), "DIAL.job"),
        (_dial(v=2), "v"),
        (_dial(v=None), "v"),
        (_dial(type="HANGUP"), "type"),
        ({"v": 1, "type": "SET_MODE", "mode": "sideways"}, "SET_MODE.mode"),
        ({"v": 1, "type": "SET_MODE", "mode": "down", "drop_calls": "yes"}, "SET_MODE.drop_calls"),
        ({"v": 1, "type": "CANCEL"}, "CANCEL.attempt_id"),
        ({"v": 1, "type": "CLAIM", "scope": "job/1", "epoch": "7"}, "CLAIM.epoch"),
    ],
)
def test_client_frame_errors_name_the_field(obj: dict[str, Any], field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_client_frame(obj)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_a_bad_dial_keeps_its_attempt_id_for_the_rejection() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_client_frame(_dial(phone=None))
    assert info.value.attempt_id == DIAL.attempt_id
    with pytest.raises(ProtocolError) as info:
        parse_client_frame(_dial(attempt_id=None))
    assert info.value.field == "DIAL.attempt_id" and info.value.attempt_id is None


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"v": 1, "type": "REJECTED", "attempt_id": "a", "reason": "tired"}, "REJECTED.reason"),
        ({**OUTCOME.to_frame(), "answered": 1}, "OUTCOME.answered"),
        ({**OUTCOME.to_frame(), "duration_ms": 1.5}, "OUTCOME.duration_ms"),
        ({"v": 1, "type": "DIAL"}, "type"),  # a client frame is not a platform frame
    ],
)
def test_platform_frame_errors_name_the_field(obj: dict[str, Any], field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_platform_frame(obj)
    assert info.value.field == field


def test_stats_reply_counters_must_be_integers() -> None:
    obj = StatsReply("up", 1, 0, 0, 0, {}, {}, 0, 0, 0, 0).to_frame()
    obj["completed"] = {"BUSY": "many"}
    with pytest.raises(ProtocolError, match=r"^STATS_REPLY\.completed: "):
        parse_platform_frame(obj)


def test_unknown_extra_fields_are_ignored() -> None:
    assert parse_client_frame({**DIAL.to_frame(), "priority": 3}) == DIAL
