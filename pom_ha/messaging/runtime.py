"""Runtime parameter changes of a running job over ActiveMQ, and the "publish" result processor's messages.

Routing (why a selector on the owner): the sender (CLI) reads the job's owner from
``ha_assignment('campaign_manager', 'job:<id>')`` and stamps it in the ``pom_owner`` header; every
Campaign Manager subscribes to the one queue :data:`RUNTIME_QUEUE` with the selector
``pom_owner = '<its instance id>'``. The broker therefore hands a change only to the CM that owned the
job when it was sent; the others never see it (no re-routing, no re-queueing loops between CMs). A CM that
receives a change for a job it no longer runs (moved meanwhile) answers ``refused`` and nothing is applied,
so the operator sends it again to the new owner. The message expires at the sender's deadline
(``expires``) so a change for an owner that died is never applied late; the CM also refuses an expired
one itself.

Replies go to the queue :data:`REPLY_QUEUE`; the sender subscribes with ``pom_request = '<request id>'``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pom_ha.messaging.stomp import Address, Frame, StompClient, StompError, StompUnavailable

RUNTIME_QUEUE = "/queue/pom.job.runtime"
REPLY_QUEUE = "/queue/pom.job.runtime.replies"
RESULTS_TOPIC = "/topic/pom.attempt.results"
OWNER_HEADER = "pom_owner"
REQUEST_HEADER = "pom_request"
Action = Literal["pacing_rate", "pause", "resume"]
ACTIONS = ("pacing_rate", "pause", "resume")


class RuntimeChangeError(Exception):
    """A change that was not (or not surely) applied; the message is meant for the operator."""


@dataclass(frozen=True)
class RuntimeChange:
    job_id: int
    action: str
    request_id: str
    owner_instance: str
    epoch: int
    pacing_rate: float | None = None  # calls per second, action pacing_rate
    expires_ms: int = 0  # epoch ms; 0 = never

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RuntimeChange:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a runtime change is a JSON object")
        change = cls(job_id=int(data["job_id"]), action=str(data["action"]), request_id=str(data["request_id"]),
                     owner_instance=str(data["owner_instance"]), epoch=int(data.get("epoch", 0)),
                     pacing_rate=None if data.get("pacing_rate") is None else float(data["pacing_rate"]),
                     expires_ms=int(data.get("expires_ms", 0)))
        change.validate()
        return change

    def validate(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; use one of {', '.join(ACTIONS)}")
        if self.job_id < 1:
            raise ValueError("job id must be at least 1")
        if self.action == "pacing_rate":
            rate = self.pacing_rate
            if rate is None or not rate > 0 or rate > 100_000:
                raise ValueError(f"pacing rate must be a number of calls per second in (0, 100000], got {rate}")

    def expired(self, now_ms: int | None = None) -> bool:
        return bool(self.expires_ms) and (now_ms if now_ms is not None else int(time.time() * 1000)) > self.expires_ms


@dataclass(frozen=True)
class RuntimeReply:
    request_id: str
    job_id: int
    status: str  # applied | refused
    detail: str
    cm_server: str = ""
    cm_instance: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RuntimeReply:
        data = json.loads(text)
        return cls(str(data["request_id"]), int(data["job_id"]), str(data["status"]), str(data["detail"]),
                   str(data.get("cm_server", "")), str(data.get("cm_instance", "")))


def change_headers(change: RuntimeChange) -> dict[str, str]:
    headers = {OWNER_HEADER: change.owner_instance, REQUEST_HEADER: change.request_id, "pom_job": str(change.job_id)}
    if change.expires_ms:
        headers["expires"] = str(change.expires_ms)
    return headers


def owner_selector(instance_id: str) -> str:
    if not instance_id.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"instance id {instance_id!r} cannot be used in a selector")
    return f"{OWNER_HEADER} = '{instance_id}'"


def new_request_id() -> str:
    return uuid.uuid4().hex


async def send_runtime_change(addresses: list[Address], change: RuntimeChange, *, timeout_s: float = 10.0,
                              grace_s: float = 2.0) -> RuntimeReply:
    """Send ``change`` (receipted) to the first broker that accepts it and wait for its CM's reply.

    The whole exchange is bounded by ``timeout_s``; the message expires at that deadline, and the reply is
    awaited ``grace_s`` longer (a CM applies only unexpired changes, so a change applied before the
    deadline is answered within the grace). A broker failover while sending is ridden out: the change is
    sent again (same request id: the CM applies one copy) to the next broker that accepts it. Raises
    :class:`RuntimeChangeError` with what is known: not accepted (nothing applied), or accepted but not
    answered (then the change expired unapplied at the broker)."""
    deadline = time.monotonic() + timeout_s
    client = StompClient(addresses, name=f"pom-ha-cli-{change.request_id[:8]}")
    replies: asyncio.Queue[RuntimeReply] = asyncio.Queue()

    async def on_reply(frame: Frame) -> None:
        try:
            replies.put_nowait(RuntimeReply.from_json(frame.body))
        except (ValueError, KeyError, TypeError):
            pass

    accepted = False
    last_error = ""
    try:
        await client.subscribe(REPLY_QUEUE, on_reply, selector=f"{REQUEST_HEADER} = '{change.request_id}'")
        while not accepted:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                if client.connected_to is None:
                    await client.connect(left)
                await client.send(RUNTIME_QUEUE, change.to_json(), headers=change_headers(change),
                                  timeout_s=max(0.1, min(5.0, deadline - time.monotonic())))
                accepted = True
            except (StompUnavailable, StompError) as exc:
                last_error = str(exc)
                await asyncio.sleep(0.05)
        if not accepted:
            raise RuntimeChangeError(
                f"no ActiveMQ broker accepted the change within {timeout_s:g} s; nothing was applied"
                + (f" ({last_error})" if last_error else ""))
        # wait for the reply; if the connection drops, reconnect: the reply waits on its queue
        end = deadline + grace_s
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise RuntimeChangeError(
                    f"the change was accepted by ActiveMQ but no Campaign Manager answered within {timeout_s:g} s;"
                    " it expired at the broker and was not applied")
            if client.connected_to is None:
                try:
                    await client.connect(left)
                except StompUnavailable:
                    continue
            try:
                async with asyncio.timeout(min(left, 0.5)):
                    return await replies.get()
            except TimeoutError:
                continue
    finally:
        await client.close()


def result_message(job_id: int, epoch: int, server: str, results: list[dict[str, Any]]) -> str:
    return json.dumps({"job_id": job_id, "epoch": epoch, "cm_server": server, "results": results})
