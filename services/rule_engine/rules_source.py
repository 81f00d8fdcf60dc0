"""The rules the Rule Engine applies, read from PostgreSQL (``dnc_list`` + ``pim_config``) and kept current.

Every Rule Engine instance keeps a loaded copy, dormants included, so a new master answers from its first
connection without a database round trip. The copy is reloaded when ``NOTIFY rule_config`` arrives (a
trigger of migration 0003 fires it on any change of either table; a burst is folded into one reload) and
whenever the LISTEN connection is re-established (notifications may have been missed). The connection is
health-checked with ``SELECT 1`` so a silently dead one is noticed. A bad setting is reported and replaced
by its default; a bad DNC entry is reported and skipped — neither stops the others from applying.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import time, timedelta
from typing import Any

import asyncpg
import structlog

from pom_ha.domain.contact_strategy import StrategySpec, strategy_rules
from pom_ha.domain.contacts import ContactRejected, normalize_phone
from pom_ha.domain.rules import CallingWindow, RuleSet
from pom_ha.ha.retry import Backoff

CHANNEL = "rule_config"
KEY_WINDOW_START = "RuleEngineCallingWindowStart"
KEY_WINDOW_END = "RuleEngineCallingWindowEnd"
KEY_MIN_GAP_MS = "RuleEngineMinGapBetweenAttemptsMs"
KEY_MAX_ATTEMPTS = "RuleEngineMaxAttempts"
SETTINGS_SQL = "SELECT key, value FROM pim_config WHERE key LIKE 'RuleEngine%'"
DNC_SQL = "SELECT phone FROM dnc_list"
DNC_LISTS_SQL = "SELECT id, is_global FROM dnc_lists"
DNC_NUMBERS_SQL = "SELECT list_id, phone FROM dnc_numbers"
CAMPAIGNS_SQL = ("SELECT c.id, s.name AS strategy, s.spec::text AS spec,"
                 " coalesce(array_agg(d.list_id) FILTER (WHERE d.list_id IS NOT NULL), '{}') AS lists"
                 " FROM campaigns c LEFT JOIN contact_strategies s ON s.id = c.strategy_id"
                 " LEFT JOIN campaign_dnc d ON d.campaign_id = c.id GROUP BY c.id, s.name, s.spec::text")
JOBS_SQL = "SELECT id::text AS id, campaign_id FROM jobs WHERE state NOT IN ('Completed', 'Stopped')"
# payloads of NOTIFY rule_config (table names) after which only the job map is read again
JOB_ONLY = frozenset({"jobs"})
DNC_TABLES = frozenset({"dnc_list", "dnc_lists", "dnc_numbers"})
log = structlog.get_logger("services.rule_engine.rules")


@dataclass(frozen=True)
class RuleBook:
    """One loaded version of the rules, with what was wrong in the source rows.

    ``rules``: pim_config's rules with the legacy and the global DNC lists (any job the book does not know);
    ``by_campaign``: each campaign's rules (its strategy, global + attached DNC lists); ``job_campaign``:
    which campaign each active job runs."""

    rules: RuleSet
    version: int = 0
    problems: tuple[str, ...] = ()
    by_campaign: Mapping[int, RuleSet] = field(default_factory=dict)
    job_campaign: Mapping[str, int] = field(default_factory=dict)

    def rules_for(self, job: str) -> RuleSet:
        campaign = self.job_campaign.get(job)
        if campaign is None:
            return self.rules
        return self.by_campaign.get(campaign, self.rules)


def rules_from_rows(settings: Mapping[str, str], dnc: Iterable[str]) -> tuple[RuleSet, list[str]]:
    """Build the rule set from ``pim_config`` values and DNC phones; returns it and the problems found."""
    problems: list[str] = []
    default = RuleSet()
    window = fallback = CallingWindow()
    try:
        window = CallingWindow(
            _wall_time(settings.get(KEY_WINDOW_START), fallback.start),
            _wall_time(settings.get(KEY_WINDOW_END), fallback.end),
        )
    except ValueError as exc:
        problems.append(f"{KEY_WINDOW_START}/{KEY_WINDOW_END}: {exc}; using {window}")
    gap_ms = _count(settings, KEY_MIN_GAP_MS, int(default.min_gap_between_attempts.total_seconds() * 1000), 0, problems)
    max_attempts = _count(settings, KEY_MAX_ATTEMPTS, default.max_attempts, 1, problems)
    phones: set[str] = set()
    for raw in dnc:
        try:
            phones.add(normalize_phone(raw))
        except ContactRejected as exc:
            problems.append(f"dnc_list: {exc}; entry skipped")
    rules = RuleSet(frozenset(phones), window, max_attempts, timedelta(milliseconds=gap_ms))
    return rules, problems


def _wall_time(raw: str | None, default: time) -> time:
    if raw is None:
        return default
    try:
        return time.fromisoformat(raw.strip())
    except ValueError:
        raise ValueError(f"{raw!r} is not a HH:MM wall-clock time") from None


def _count(settings: Mapping[str, str], key: str, default: int, minimum: int, problems: list[str]) -> int:
    raw = settings.get(key)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        value = minimum - 1
    if value < minimum:
        problems.append(f"{key}: {raw!r} is not an integer >= {minimum}; using {default}")
        return default
    return value


@dataclass
class RuleConfigSource:
    dsn: str
    timeout_s: float = 1.0
    load_timeout_s: float = 10.0
    health_interval_s: float = 2.0
    debounce_s: float = 0.05
    backoff: Backoff = field(default_factory=lambda: Backoff(initial_s=0.1, max_s=2.0))
    book: RuleBook | None = None
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _dirty: set[str] = field(default_factory=set)
    _dnc_sets: dict[int, frozenset[str]] = field(default_factory=dict)

    def rules_for(self, job: str) -> RuleSet:
        assert self.book is not None, "rules not loaded yet"
        return self.book.rules_for(job)

    async def wait_loaded(self) -> RuleBook:
        await self.loaded.wait()
        assert self.book is not None
        return self.book

    def rules(self) -> RuleSet:
        assert self.book is not None, "rules not loaded yet"
        return self.book.rules

    async def run(self) -> None:
        while True:
            conn: Any = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=self.timeout_s,
                                             server_settings={"application_name": "pom-ha:rule-engine-config"})
                await conn.add_listener(CHANNEL, self._on_notify)
                conn.add_termination_listener(lambda _c: self._changed.set())
                self._dirty.add("*")  # (re)connected: notifications may have been missed
                while True:
                    self._changed.clear()
                    dirty, self._dirty = self._dirty, set()
                    await self._reload(conn, dirty)
                    self.backoff.reset()
                    await self._wait_change(conn)
                    await asyncio.sleep(self.debounce_s)  # fold a burst of notifications into one reload
            except (OSError, TimeoutError, ConnectionError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("rule config connection lost; keeping the loaded rules",
                            error=f"{type(exc).__name__}: {exc}", loaded=self.book is not None)
            finally:
                if conn is not None:
                    conn.terminate()
            await self.backoff.wait()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._dirty.add(payload or "*")
        self._changed.set()

    async def _wait_change(self, conn: Any) -> None:
        while not self._changed.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.health_interval_s):
                    await self._changed.wait()
            if conn.is_closed():
                raise ConnectionError("rule config connection closed")
            if not self._changed.is_set():
                await conn.fetchval("SELECT 1", timeout=self.timeout_s)

    async def _reload(self, conn: Any, dirty: set[str] | None = None) -> None:
        dirty = {"*"} if dirty is None or self.book is None else dirty
        if dirty and dirty <= JOB_ONLY and self.book is not None:
            jobs = await conn.fetch(JOBS_SQL, timeout=self.load_timeout_s)
            self.book = replace(self.book, job_campaign={r["id"]: int(r["campaign_id"]) for r in jobs})
            return
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            settings = {r["key"]: r["value"] for r in await conn.fetch(SETTINGS_SQL, timeout=self.load_timeout_s)}
            phones = [r["phone"] for r in await conn.fetch(DNC_SQL, timeout=self.load_timeout_s)]
            lists = {int(r["id"]): bool(r["is_global"]) for r in await conn.fetch(DNC_LISTS_SQL,
                                                                                 timeout=self.load_timeout_s)}
            if "*" in dirty or dirty & DNC_TABLES:
                numbers: dict[int, set[str]] = {i: set() for i in lists}
                for r in await conn.fetch(DNC_NUMBERS_SQL, timeout=self.load_timeout_s):
                    numbers.setdefault(int(r["list_id"]), set()).add(r["phone"])
                self._dnc_sets = {i: frozenset(p) for i, p in numbers.items()}
            campaigns = await conn.fetch(CAMPAIGNS_SQL, timeout=self.load_timeout_s)
            jobs = await conn.fetch(JOBS_SQL, timeout=self.load_timeout_s)
        rules, problems = rules_from_rows(settings, phones)
        global_sets = tuple(self._dnc_sets.get(i, frozenset()) for i, g in sorted(lists.items()) if g)
        base = replace(rules, dnc_lists=global_sets)
        by_campaign: dict[int, RuleSet] = {}
        for c in campaigns:
            attached = tuple(self._dnc_sets.get(int(i), frozenset())
                             for i in sorted(c["lists"]) if not lists.get(int(i)))
            spec: StrategySpec | None = None
            if c["spec"] is not None:
                try:
                    spec = StrategySpec.model_validate_json(c["spec"])
                except ValueError as exc:
                    problems.append(f"strategy {c['strategy']!r}: {exc}; campaign {c['id']} uses the default rules")
            by_campaign[int(c["id"])] = strategy_rules(spec, rules, global_sets + attached)
        version = (self.book.version + 1) if self.book else 1
        changed = self.book is None or self.book.rules != base or dict(self.book.by_campaign) != by_campaign
        self.book = RuleBook(base, version, tuple(problems), by_campaign,
                             {r["id"]: int(r["campaign_id"]) for r in jobs})
        self.loaded.set()
        for problem in problems:
            log.error("bad rule configuration", problem=problem)
        if changed:
            gap_ms = int(rules.min_gap_between_attempts.total_seconds() * 1000)
            log.info("rules loaded", version=version, dnc=len(rules.dnc) + sum(len(s) for s in global_sets),
                     dnc_lists=len(lists), campaigns=len(by_campaign), window=str(rules.calling_window),
                     max_attempts=rules.max_attempts, min_gap_ms=gap_ms)
