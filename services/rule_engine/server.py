"""The Rule Engine's socket server for one master term: a listener and its client connections.

Every connection handler is a task of the term, so the end of the term (demotion, release, stop) cancels
them all in the same loop step; :meth:`RuleServer.close` then aborts the sockets without flushing, so no
reply of an ended term leaves after it. Requests on one connection are answered in order; a malformed
one gets ERROR and closes that connection only.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from pom_ha.clients.rule_engine import Req
from pom_ha.domain.rules import RuleSet
from pom_ha.ha.term import MasterTerm, NotMaster
from pom_ha.wire import WireError, read_frame, write_frame
from services.rule_engine.protocol import (
    EvaluateRequest,
    ProtocolError,
    Request,
    error_frame,
    judge,
    parse_request,
    pong_frame,
    request_id,
    verdict_frame,
)

log = structlog.get_logger("services.rule_engine.server")
BIND_RETRIES = 20


@dataclass
class ServeCounts:
    connections: int = 0
    evaluations: int = 0
    allowed: int = 0
    refused: int = 0
    errors: int = 0


class RuleServer:
    def __init__(
        self, term: MasterTerm, rules: Callable[[], RuleSet], *, is_master: Callable[[], bool] = lambda: True,
        wait_master: Callable[[], Awaitable[object]] | None = None, counts: ServeCounts | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rules_for: Callable[[str], RuleSet] | None = None,
    ) -> None:
        self.term = term
        self._rules = rules
        self._rules_for = rules_for
        self._is_master = is_master
        self._wait_master = wait_master
        self.counts = counts or ServeCounts()
        self._clock = clock
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._log = log.bind(epoch=term.epoch)

    @property
    def connections(self) -> int:
        return len(self._writers)

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 = ephemeral); returns the bound port. Retries a port still held briefly."""
        for attempt in range(BIND_RETRIES):
            try:
                self._server = await asyncio.start_server(self._accept, host, port, reuse_address=True)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or attempt == BIND_RETRIES - 1:
                    raise
                await asyncio.sleep(0.05)
        assert self._server is not None
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    def close(self) -> None:
        """Stop listening and drop every client connection now (synchronous)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None or not self.term.active:
            writer.transport.abort()
            return
        self._writers.add(writer)
        self.counts.connections += 1
        try:
            self.term.create_task(self._serve(reader, writer), name="rule-engine-connection")
        except NotMaster:
            self._drop(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (frame := await read_frame(reader)) is not None:
                try:
                    request = parse_request(frame)
                except ProtocolError as exc:
                    await self._refuse(writer, str(exc), request_id(frame))
                    return
                if not self._is_master() and self._wait_master is not None:
                    await self._wait_master()  # store suspended: hold the answer until confirmed (or cancelled)
                await write_frame(writer, self._answer(request))
        except WireError as exc:
            await self._refuse(writer, str(exc), None)
        except OSError:
            pass
        finally:
            self._drop(writer)

    def _answer(self, request: Request) -> dict[str, Any]:
        if not isinstance(request, EvaluateRequest):
            return pong_frame(request.req, self.term.epoch)
        rules = self._rules_for(request.job) if self._rules_for is not None else self._rules()
        verdict = judge(rules, request, self._clock())
        self.counts.evaluations += 1
        if verdict.allowed:
            self.counts.allowed += 1
        else:
            self.counts.refused += 1
        return verdict_frame(request, self.term.epoch, verdict)

    async def _refuse(self, writer: asyncio.StreamWriter, reason: str, req: Req | None) -> None:
        self.counts.errors += 1
        self._log.warning("malformed request; closing that connection", reason=reason,
                          peer=str(writer.get_extra_info("peername")))
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await write_frame(writer, error_frame(reason, self.term.epoch, req))

    def _drop(self, writer: asyncio.StreamWriter) -> None:
        self._writers.discard(writer)
        if self.term.active:
            writer.close()  # flushes an ERROR still buffered
        else:
            writer.transport.abort()  # nothing of an ended term may leave
