"""The operational cache client CD, CM and AM use: pyignite ``AioClient`` over every Ignite node's address.

pyignite does not retry, so this class does: every operation is idempotent (whole values under stable keys,
see :mod:`pom_ha.cache.models`), runs under a per-attempt timeout, and after a failure the connection is
dropped and the next attempt connects to any live node (addresses shuffled per client, so clients spread).
Losing one node therefore costs a retry, never a failed operation.

When no node answers, an operation ends quickly with the impact error of the guide's list
(:mod:`pom_ha.cache.errors`): a failed attempt is followed by a parallel thin-client handshake with every
node; when none answers, the operation is refused at once instead of waiting for its deadline. A node that
hangs (SIGSTOP) is bounded by the attempt timeout and the overall deadline — never a hang.

After the whole cache was lost, the caches come back empty: until a cache service has rebuilt them from
PostgreSQL (``pom-meta`` then holds a generation), gated operations are refused with the same errors and
the reason "being rebuilt", so nothing reads or writes half-loaded data.

Clients never create caches (only the rebuild does, once the cluster has settled): a dynamic cache start
racing nodes that join a restarting cluster was seen to halt Ignite nodes ("Failed to execute affinity
operation on cache groups"). An operation on a cache that does not exist yet is refused as "being rebuilt".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from pyignite import AioClient
from pyignite.exceptions import CacheError

from pom_ha.cache.errors import (
    AddContactRefused,
    AgentStateUnavailable,
    CacheUnavailable,
    CallbackRefused,
    JobStartRefused,
    StatisticsFrozen,
)
from pom_ha.cache.models import (
    AGENTS,
    CALLBACKS,
    CONTACTS,
    GENERATION_KEY,
    JOBS,
    META,
    AgentEntry,
    Callback,
    ContactAdd,
    JobEntry,
)
from pom_ha.config import Topology
from pom_ha.config.addresses import CLIENT_ERRORS, thin_client_addresses
from pom_ha.ha.retry import Backoff
from pom_ha.infra.ignite import thin_handshake

T = TypeVar("T")
log = structlog.get_logger("pom_ha.cache.client")

#: errors after which another attempt (on another node) can succeed
RETRIABLE: tuple[type[BaseException], ...] = (*CLIENT_ERRORS, CacheError, ConnectionError)


def quiet_pyignite_logs() -> None:
    """pyignite logs an error with a traceback for every refused connection; this client retries and reports
    by itself, so a daemon using it calls this once at start."""
    logging.getLogger("pyignite").setLevel(logging.CRITICAL)


@dataclass
class CacheClientStats:
    ok: int = 0  # operations that succeeded (after any number of attempts)
    retries: int = 0  # failed attempts that were retried
    refused: int = 0  # operations that ended in a CacheUnavailable
    reconnects: int = 0  # connections opened


class OperationalCache:
    """Typed accessors over the REPLICATED ``pom-*`` caches. Use one instance per process (it is safe to call
    from many tasks at once); ``async with OperationalCache(...)`` or :meth:`close` at the end."""

    def __init__(
        self, addresses: Sequence[tuple[str, int]], *, op_timeout_s: float = 8.0, deadline_s: float = 30.0,
        handshake_timeout_s: float = 2.0, probe_timeout_s: float = 2.0,
    ) -> None:
        if not addresses:
            raise ValueError("the cache client needs at least one Ignite node address")
        self.addresses = list(addresses)
        self.op_timeout_s = op_timeout_s
        self.deadline_s = deadline_s
        self.handshake_timeout_s = handshake_timeout_s
        self.probe_timeout_s = probe_timeout_s
        self.stats = CacheClientStats()
        self._client: AioClient | None = None
        self._created: set[str] = set()
        self._ready_client: AioClient | None = None  # the connection on which a generation was seen
        self._connect_lock = asyncio.Lock()

    @classmethod
    def from_topology(cls, topo: Topology, **kwargs: Any) -> OperationalCache:
        return cls(thin_client_addresses(topo), **kwargs)

    async def __aenter__(self) -> OperationalCache:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        client, self._client = self._client, None
        self._created = set()
        if client is not None:
            await _close_quietly(client)

    # ---- jobs (Campaign Director / Campaign Manager / monitor) ------------------------------------------
    async def start_job(self, entry: JobEntry) -> None:
        """Put a job that is starting (normally in Filter in Progress). Raises :class:`JobStartRefused`."""
        await self._put(JobStartRefused, f"start job {entry.job_id}", JOBS, str(entry.job_id), entry.encode())

    async def put_job(self, entry: JobEntry) -> None:
        """Publish a job's state and statistics (the owner CM). Raises :class:`StatisticsFrozen`."""
        await self._put(StatisticsFrozen, f"update job {entry.job_id}", JOBS, str(entry.job_id), entry.encode())

    async def get_job(self, job_id: int) -> JobEntry | None:
        raw = await self._get(StatisticsFrozen, f"read job {job_id}", JOBS, str(job_id))
        return JobEntry.decode(raw) if raw is not None else None

    async def job_statistics(self, job_ids: Iterable[int]) -> dict[int, JobEntry]:
        """The monitor's read of several jobs at once. Raises :class:`StatisticsFrozen`."""
        keys = [str(j) for j in job_ids]

        async def op(client: AioClient) -> dict[Any, Any]:
            return dict(await (await self._cache(client, JOBS)).get_all(keys))

        found = await self._call(StatisticsFrozen, f"read statistics of {len(keys)} jobs", op)
        return {int(k): JobEntry.decode(v) for k, v in found.items()}

    async def remove_job(self, job_id: int) -> None:
        await self._remove(StatisticsFrozen, f"remove job {job_id}", JOBS, str(job_id))

    # ---- agents (Agent Manager) -------------------------------------------------------------------------
    async def set_agent_state(self, entry: AgentEntry) -> None:
        """Agent states are not rebuilt from PostgreSQL (the Agent Manager republishes them): not gated."""
        await self._put(AgentStateUnavailable, f"set agent {entry.agent_id} {entry.state}", AGENTS,
                        entry.agent_id, entry.encode(), gated=False)

    async def get_agent_state(self, agent_id: str) -> AgentEntry | None:
        raw = await self._get(AgentStateUnavailable, f"read agent {agent_id}", AGENTS, agent_id, gated=False)
        return AgentEntry.decode(raw) if raw is not None else None

    # ---- callbacks (agents through the Agent Manager) ------------------------------------------------------
    async def set_callback(self, cb: Callback) -> None:
        """Raises :class:`CallbackRefused` while the cache is down or being rebuilt."""
        await self._put(CallbackRefused, f"set callback {cb.callback_id} for contact {cb.contact_id} of job "
                        f"{cb.job_id}", CALLBACKS, cb.callback_id, cb.encode())

    async def get_callback(self, callback_id: str) -> Callback | None:
        raw = await self._get(CallbackRefused, f"read callback {callback_id}", CALLBACKS, callback_id)
        return Callback.decode(raw) if raw is not None else None

    async def remove_callback(self, callback_id: str) -> None:
        await self._remove(CallbackRefused, f"remove callback {callback_id}", CALLBACKS, callback_id)

    # ---- contacts added by web service ---------------------------------------------------------------------
    async def add_contact(self, contact: ContactAdd) -> None:
        """Raises :class:`AddContactRefused` while the cache is down or being rebuilt."""
        await self._put(AddContactRefused, f"add contact {contact.contact_id} to list {contact.list_id}",
                        CONTACTS, contact.key, contact.encode())

    async def get_contact(self, list_id: int, contact_id: str) -> ContactAdd | None:
        raw = await self._get(AddContactRefused, f"read contact {contact_id}", CONTACTS, f"{list_id}:{contact_id}")
        return ContactAdd.decode(raw) if raw is not None else None

    # ---- cache metadata (the rebuild and the cache service) --------------------------------------------------
    async def generation(self) -> int | None:
        """The generation of the last rebuild; None when the cache was lost and is not rebuilt yet. A reader
        that sees it change knows the whole cache was lost in between (CM: apply ``CACHE_REBUILT``)."""
        try:
            raw = await self._get(CacheUnavailable, "read the cache generation", META, GENERATION_KEY, gated=False)
        except CacheUnavailable as exc:
            if exc.rebuilding:
                return None
            raise
        return int(raw) if raw is not None else None

    async def ungated(self, what: str, fn: Callable[[Any], Awaitable[T]], *caches: str) -> T:
        """Run ``fn(handles)`` (one pyignite cache handle per name in ``caches``, created when missing) with
        the retries of every operation but no rebuild gate: for the rebuild itself. ``fn`` must be idempotent."""

        async def op(client: AioClient) -> T:
            handles = [await self._cache(client, name, create=True) for name in caches]
            return await fn(handles)

        return await self._call(CacheUnavailable, what, op, gated=False)

    @property
    def connected_to(self) -> tuple[str, int] | None:
        """The node the current connection goes to (diagnostics, tests); None when not connected."""
        client = self._client
        if client is None:
            return None
        with contextlib.suppress(AttributeError, IndexError):
            node = client._nodes[client._current_node]  # pyignite keeps no public accessor for this
            if node.alive:
                return (str(node.host), int(node.port))
        return None

    async def any_node_answers(self) -> bool:
        results = await asyncio.gather(
            *(thin_handshake(host, port, self.probe_timeout_s) for host, port in self.addresses)
        )
        return any(results)

    # ---- the retry core ----------------------------------------------------------------------------------
    async def _put(self, error: type[CacheUnavailable], what: str, cache: str, key: str, value: str, *,
                   gated: bool = True) -> None:
        async def op(client: AioClient) -> None:
            await (await self._cache(client, cache)).put(key, value)

        await self._call(error, what, op, gated=gated)

    async def _get(self, error: type[CacheUnavailable], what: str, cache: str, key: str, *,
                   gated: bool = True) -> Any:
        async def op(client: AioClient) -> Any:
            return await (await self._cache(client, cache)).get(key)

        return await self._call(error, what, op, gated=gated)

    async def _remove(self, error: type[CacheUnavailable], what: str, cache: str, key: str) -> None:
        async def op(client: AioClient) -> None:
            await (await self._cache(client, cache)).remove_key(key)

        await self._call(error, what, op)

    async def _call(self, error: type[CacheUnavailable], what: str, op: Callable[[AioClient], Awaitable[T]], *,
                    gated: bool = True) -> T:
        deadline = time.monotonic() + self.deadline_s
        backoff = Backoff(initial_s=0.05, max_s=0.5)
        while True:
            client: AioClient | None = None
            try:
                client = await self._connected()
                async with asyncio.timeout(self.op_timeout_s):
                    if gated and self._ready_client is not client:
                        if await (await self._cache(client, META)).get(GENERATION_KEY) is None:
                            self.stats.refused += 1
                            raise error(what, "the whole cache was lost and is being rebuilt from PostgreSQL",
                                        rebuilding=True)
                        self._ready_client = client
                    result = await op(client)
                self.stats.ok += 1
                return result
            except CacheError as exc:
                if not _missing_cache(exc):
                    self.stats.retries += 1
                    if client is not None:
                        await self._drop(client)
                    last: BaseException = exc
                elif self._created or self._ready_client is not None:
                    # pyignite reconnected this client underneath to a cluster that came back empty: the caches
                    # it created before are gone, so the memo is stale; forget it and try once more (an
                    # ungated operation then creates its caches again, a plain one fails as "being rebuilt")
                    self._created, self._ready_client = set(), None  # and check the generation again
                    self.stats.retries += 1
                    last = exc
                else:
                    self.stats.refused += 1
                    raise error(what, "the whole cache was lost and is being rebuilt from PostgreSQL (its caches "
                                "do not exist yet)", rebuilding=True) from exc
            except RETRIABLE as exc:
                self.stats.retries += 1
                if client is not None:
                    await self._drop(client)
                last = exc
            if time.monotonic() >= deadline:
                self.stats.refused += 1
                raise error(what, f"no cache node answered within {self.deadline_s:.0f} s ({last!r})") from last
            if not await self.any_node_answers():
                self.stats.refused += 1
                down = ", ".join(f"{h}:{p}" for h, p in self.addresses)
                raise error(what, f"no cache node is reachable (all {len(self.addresses)} down: {down})") from last
            await backoff.wait()

    async def _connected(self) -> AioClient:
        async with self._connect_lock:
            if self._client is not None:
                return self._client
            addresses = list(self.addresses)
            random.shuffle(addresses)
            client = AioClient(partition_aware=False, handshake_timeout=self.handshake_timeout_s)
            try:
                # longer than every handshake together: pyignite breaks on a reply to a cancelled handshake
                async with asyncio.timeout(self.handshake_timeout_s * len(addresses) + 2.0):
                    await client.connect(addresses)
            except BaseException:
                await _close_quietly(client)
                raise
            self.stats.reconnects += 1
            self._client, self._created, self._ready_client = client, set(), None
            return client

    async def _cache(self, client: AioClient, name: str, *, create: bool = False) -> Any:
        current = self._client
        if current is None or client is not current:
            raise ConnectionError("the connection was replaced during the operation")
        if not create:
            return await current.get_cache(name)  # no round trip; a missing cache fails the operation
        if name not in self._created:
            await current.get_or_create_cache(name)
            if client is self._client:
                self._created.add(name)
        return await current.get_cache(name)

    async def _drop(self, client: AioClient) -> None:
        if self._client is client:
            self._client, self._created, self._ready_client = None, set(), None
        await _close_quietly(client)


def _missing_cache(exc: CacheError) -> bool:
    return "does not exist" in str(exc).lower()


async def _close_quietly(client: AioClient) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2.0):
            await client.close()
