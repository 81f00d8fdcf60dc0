"""Desktop frames: every type round-trips; every broken frame becomes a ProtocolError naming the field, and
over a socket it costs the sender an ERROR frame and its connection, nobody else."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from pom_ha.desktop.protocol import (
    AgentStateFrame,
    CallbackAccept,
    CallbackOffered,
    CallbackRequest,
    CallEvent,
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
    ProtocolCounters,
    ProtocolError,
    Ready,
    StateQuery,
    StateReport,
    WrapUp,
    error_frame,
    parse_frame,
    read_frame,
    refuse_and_close,
    write_frame,
)
from pom_ha.domain.agents import AgentJobState, CallState, EventKind
from pom_ha.wire import decode, encode

AT = datetime(2026, 12, 1, 18, 30, tzinfo=UTC)
LOGIN = Login(req=1, agent_id="agent7", zone="zone1", desktop_id="desk-7")

TO_MANAGER = [
    LOGIN, Logout(req=2), Ready(req="r3"), NotReady(req=4, reason_code="LUNCH"), JobAttach(req=5, job_id="job1"),
    PreviewAccept(req=6, call_id="c1"), PreviewCancel(req=7, call_id="c1"), CallbackAccept(req=8, call_id="cb1"),
    WrapUp(req=9, call_id="c1", completion_code="SALE"),
    WrapUp(req=10, call_id="c1", completion_code="CALL_BACK", callback=CallbackRequest(at=AT, phone="+15550001")),
    StateReport(req=11, call_state=CallState.PENDING_CALL, call_id="c1", job_id="job1"),
    Heartbeat(seq=0), CallEvent(req=12, call_id="c1", event="held"),
    CallEvent(req=13, call_id="c1", event="consult", consult_agent_id="agent8"),
]
TO_DESKTOP = [
    LoginOk(req=1, agent_id="agent7", zone="zone1", session_id="s1", master="pom2", epoch=3,
            heartbeat_interval_ms=500, heartbeat_miss_limit=3, manager_addresses=["127.0.0.1:7500", "127.0.0.2:7500"]),
    Ok(req="r3"), ErrorFrame(req=4, code="invalid_transition", reason="agent agent7 Talking: cannot logout",
                             fatal=False),
    AgentStateFrame(logged_in=True, ready=True, call_state=CallState.CONFERENCE_OWNER,
                    job_state=AgentJobState.PENDING_MANUAL_JOB_MOVEMENT, job_id="job1", call_id="c1"),
    PreviewOffered(call_id="c2", job_id="job1", contact_id="k9", phone="+15550002"),
    CallbackOffered(call_id="cb1", job_id="job1", contact_id="k9", phone="+15550002", due_at=AT),
    PomNotAvailable(zone="zone1", reason="master pom1 lost"), PomAvailable(zone="zone1", master="pom2", epoch=4),
    StateQuery(req=77), ForcedLogout(reason="desktop_error", detail="manager says Talking, desktop says Idle"),
    Heartbeat(seq=41), CallEvent(call_id="c1", event="offered"),
]


def _wire(frame: dict[str, Any]) -> dict[str, Any]:
    return decode(encode(frame)[4:])


@pytest.mark.parametrize("frame", TO_MANAGER, ids=lambda f: f.TYPE)
def test_desktop_frames_round_trip(frame: Any) -> None:
    obj = _wire(frame.to_frame())
    assert obj["v"] == 1 and obj["type"] == frame.TYPE
    assert parse_frame(obj, "to_manager") == frame


@pytest.mark.parametrize("frame", TO_DESKTOP, ids=lambda f: f.TYPE)
def test_manager_frames_round_trip(frame: Any) -> None:
    assert parse_frame(_wire(frame.to_frame()), "to_desktop") == frame


def test_states_travel_by_their_display_names() -> None:
    obj = TO_DESKTOP[3].to_frame()
    assert obj["call_state"] == "ConferenceOwner" and obj["job_state"] == "Pending Manual Job Movement"


def test_unknown_extra_fields_are_ignored() -> None:
    assert parse_frame({**LOGIN.to_frame(), "skin": "dark"}, "to_manager") == LOGIN


def test_call_event_maps_to_the_domain_event() -> None:
    event = CallEvent(req=1, call_id="c1", event="consult_ended").to_agent_event()
    assert event.kind is EventKind.CONSULT_ENDED and event.call_id == "c1"


def _login(**changes: Any) -> dict[str, Any]:
    obj = LOGIN.to_frame()
    for key, value in changes.items():
        if value is None:
            obj.pop(key)
        else:
            obj[key] = value
    return obj


@pytest.mark.parametrize(
    ("obj", "direction", "code", "field"),
    [
        (_login(agent_id=None), "to_manager", "malformed", "LOGIN.agent_id"),
        (_login(agent_id=7), "to_manager", "malformed", "LOGIN.agent_id"),
        (_login(agent_id=""), "to_manager", "malformed", "LOGIN.agent_id"),
        (_login(zone="z" * 201), "to_manager", "malformed", "LOGIN.zone"),
        (_login(req=True), "to_manager", "malformed", "LOGIN.req"),
        (_login(req=["x"]), "to_manager", "malformed", "LOGIN.req"),
        (_login(v=2), "to_manager", "unsupported_version", "v"),
        (_login(v=True), "to_manager", "unsupported_version", "v"),
        (_login(v="1"), "to_manager", "unsupported_version", "v"),
        (_login(v=None), "to_manager", "unsupported_version", "v"),
        (_login(type="HACK"), "to_manager", "malformed", "type"),
        (_login(type=None), "to_manager", "malformed", "type"),
        (LoginOk(req=1, agent_id="a", zone="z", session_id="s", master="m", epoch=0, heartbeat_interval_ms=500,
                 heartbeat_miss_limit=3).to_frame(), "to_manager", "malformed", "type"),  # wrong direction
        ({"v": 1, "type": "WRAP_UP", "req": 1, "call_id": "c1", "completion_code": "sale"}, "to_manager",
         "malformed", "WRAP_UP.completion_code"),
        ({"v": 1, "type": "WRAP_UP", "req": 1, "call_id": "c1", "completion_code": "SALE",
          "callback": {"at": "2026-12-01T18:30:00"}}, "to_manager", "malformed", "WRAP_UP.callback.at"),
        ({"v": 1, "type": "STATE_REPORT", "req": 1, "call_state": "Sleeping"}, "to_manager", "malformed",
         "STATE_REPORT.call_state"),
        ({"v": 1, "type": "HEARTBEAT", "seq": -1}, "to_manager", "malformed", "HEARTBEAT.seq"),
        ({"v": 1, "type": "HEARTBEAT", "seq": 1.5}, "to_manager", "malformed", "HEARTBEAT.seq"),
        ({"v": 1, "type": "CALL_EVENT", "req": 1, "call_id": "c1", "event": "offered"}, "to_manager", "malformed",
         "CALL_EVENT.event"),  # only the manager offers calls
        ({"v": 1, "type": "CALL_EVENT", "call_id": "c1", "event": "held"}, "to_desktop", "malformed",
         "CALL_EVENT.event"),
        ({"v": 1, "type": "CALL_EVENT", "call_id": "c1", "event": "teleport"}, "to_desktop", "malformed",
         "CALL_EVENT.event"),
        ({"v": 1, "type": "ERROR", "code": "meh", "reason": "x", "fatal": False}, "to_desktop", "malformed",
         "ERROR.code"),
        ({"v": 1, "type": "LOGIN_OK", "req": 1, "agent_id": "a", "zone": "z", "session_id": "s", "master": "m",
          "epoch": 0, "heartbeat_interval_ms": 1, "heartbeat_miss_limit": 3}, "to_desktop", "malformed",
         "LOGIN_OK.heartbeat_interval_ms"),
    ],
)
def test_bad_frames_name_the_field(obj: dict[str, Any], direction: Any, code: str, field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_frame(obj, direction)
    assert (info.value.code, info.value.field) == (code, field), str(info.value)


def test_error_keeps_a_readable_req_and_is_fatal_for_protocol_breaks() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_frame(_login(agent_id=None), "to_manager")
    frame = error_frame(info.value)
    assert frame.req == 1 and frame.fatal and frame.code == "malformed" and "LOGIN.agent_id" in frame.reason


# ---- frames read from a stream -----------------------------------------------------------------------------
def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def _raw(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


@pytest.mark.parametrize(("data", "code", "text"), [
    (struct.pack(">I", 70_000) + b"{}", "oversized", "exceeds"),
    (_raw(b"not json"), "malformed", "not valid JSON"),
    (_raw(b"\xff\xfe"), "malformed", "not valid JSON"),
    (_raw(b"[1, 2]"), "malformed", "JSON object"),
    (_raw(b'{"v": 1, "type": "HEARTBEAT"}')[:-3], "malformed", "inside a frame"),
    (b"\x00\x00", "malformed", "frame header"),
    (_raw(json.dumps({"v": 9, "type": "HEARTBEAT", "seq": 1}).encode()), "unsupported_version", "v"),
])
async def test_read_frame_turns_broken_streams_into_protocol_errors(data: bytes, code: str, text: str) -> None:
    with pytest.raises(ProtocolError) as info:
        await read_frame(_reader(data), "to_manager")
    assert info.value.code == code and text in str(info.value)


async def test_read_frame_reads_frames_then_a_clean_end() -> None:
    reader = _reader(Heartbeat(seq=1).to_bytes() + LOGIN.to_bytes())
    assert await read_frame(reader, "to_manager") == Heartbeat(seq=1)
    assert await read_frame(reader, "to_manager") == LOGIN
    assert await read_frame(reader, "to_manager") is None


def test_a_frame_too_big_to_send_is_refused_before_it_leaves() -> None:
    with pytest.raises(Exception, match="exceeds"):
        ErrorFrame(code="malformed", reason="x" * 2000, fatal=True).to_bytes(max_bytes=100)


# ---- over a socket: a broken frame costs its sender the connection, nobody else ---------------------------
@pytest.fixture
async def echo_server() -> AsyncIterator[tuple[int, ProtocolCounters, asyncio.Event]]:
    """A minimal manager: answers HEARTBEAT with HEARTBEAT, refuses and closes on any broken frame."""
    counters = ProtocolCounters()
    refused = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                frame = await read_frame(reader, "to_manager")
                if frame is None:
                    break
                if isinstance(frame, Heartbeat):
                    await write_frame(writer, Heartbeat(seq=frame.seq))
        except ProtocolError as exc:
            await refuse_and_close(writer, exc, counters)
            refused.set()
            return
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield port, counters, refused


async def test_broken_frame_gets_an_error_frame_and_only_that_connection_closes(
    echo_server: tuple[int, ProtocolCounters, asyncio.Event],
) -> None:
    port, counters, _refused = echo_server
    good_r, good_w = await asyncio.open_connection("127.0.0.1", port)
    bad_r, bad_w = await asyncio.open_connection("127.0.0.1", port)
    big_r, big_w = await asyncio.open_connection("127.0.0.1", port)

    bad_w.write(_raw(b'{"v": 1, "type": "LOGIN", "req": 5}'))
    big_w.write(struct.pack(">I", 1_000_000) + b"x" * 100)
    await asyncio.gather(bad_w.drain(), big_w.drain())

    error = await asyncio.wait_for(read_frame(bad_r, "to_desktop"), 2)
    assert isinstance(error, ErrorFrame) and error.fatal and error.code == "malformed" and error.req == 5
    assert "LOGIN.agent_id" in error.reason
    assert await asyncio.wait_for(bad_r.read(), 2) == b""  # closed by the manager

    oversized = await asyncio.wait_for(read_frame(big_r, "to_desktop"), 2)
    assert isinstance(oversized, ErrorFrame) and oversized.code == "oversized"
    assert await asyncio.wait_for(big_r.read(), 2) == b""

    await write_frame(good_w, Heartbeat(seq=9))
    assert await asyncio.wait_for(read_frame(good_r, "to_desktop"), 2) == Heartbeat(seq=9)
    assert counters.as_dict() == {"error_malformed": 1, "error_oversized": 1, "closed": 2}
    for w in (good_w, bad_w, big_w):
        w.close()


async def test_refuse_and_close_survives_a_peer_that_is_already_gone(
    echo_server: tuple[int, ProtocolCounters, asyncio.Event],
) -> None:
    port, counters, refused = echo_server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_raw(b"garbage"))
    writer.close()  # gone before the manager answers
    await writer.wait_closed()
    await asyncio.wait_for(refused.wait(), 2)
    assert counters.closed == 1 and counters.errors["malformed"] == 1
    del reader
