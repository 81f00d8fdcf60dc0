"""``pom-ha chaos run``: random faults on a running lab while campaigns dial, then the checker.

Sequence:

1. Refuse up front (:class:`RunRefused`, nothing injected) when the lab is not running (PostgreSQL
   unreachable, a daemon or server process down, a role without a master) or when a requested fault kind is
   impossible on the topology (one server; no second instance of what it would take away).
2. Start the run's own campaigns (an agentless one, and an agent-based one in the first zone with a desktop
   simulator of ``agents`` bots) over small contact lists, so that they end soon after the faults stop; the
   lab's demo campaigns dial beside them.
3. Up to ``concurrency`` workers draw faults (:mod:`pom_ha.chaos.plan` keeps every combination survivable),
   inject, wait until the system has recovered (every role that had a master has one on a server the fault
   did not take away, the pool's jobs left the lost Campaign Manager, the infra kind serves again), hold a
   moment, heal, and wait until what was healed is whole again (Kafka in sync, Ignite joined) before
   releasing the budget. One history line per fault, one printed line per fault.
4. Every fault is healed in ``finally`` (also on a failed check, Ctrl-C or SIGTERM); then the runner lists
   leftovers (rules, namespaces, paused processes), lets the run's campaigns finish, writes the end line and
   runs the checker (:mod:`pom_ha.chaos.checker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from pom_ha.chaos.checker import Violation, by_kind, collect, judge
from pom_ha.chaos.faults import (
    FAULT_KINDS,
    INFRA_KINDS,
    SERVICE_OF,
    Fault,
    LabControl,
    Partition,
    PostgresRestart,
    ProcessLab,
)
from pom_ha.chaos.history import HistoryWriter, lab_fingerprint
from pom_ha.chaos.plan import WEIGHTS, draw, refuse_impossible

#: the guide's failover time per fault target, seconds (Chapter 4: CD 2 min 20 s, CM 5 min, AM 40 s, ActiveMQ
#: 2 min 20 s; a whole server 10 min to be fully operational)
POM_SECONDS = {"campaign-director": 140.0, "campaign-manager": 300.0, "agent-manager": 40.0, "activemq": 140.0,
               "server-kill": 600.0}
FINAL = ("Completed", "Stopped")


class RunRefused(Exception):
    """The run cannot start: the message says why; nothing was injected."""


@dataclass
class RunOptions:
    faults: int = 25
    seed: int = 0
    concurrency: int = 1
    minutes: float | None = None
    kinds: tuple[str, ...] = FAULT_KINDS
    history: Path = Path("chaos-history.jsonl")
    contacts: int = 300
    calls_per_second: float = 3.0
    agents: int = 10
    recovery_timeout_s: float = 120.0
    whole_timeout_s: float = 180.0
    hold_s: tuple[float, float] = (0.3, 1.5)
    settle_timeout_s: float = 600.0
    check: bool = True


@dataclass
class FaultRecord:
    n: int
    fault: Fault
    injected_at: datetime
    recovered_at: datetime | None = None
    recovery_s: float | None = None
    healed_at: datetime | None = None
    error: str | None = None


@dataclass
class RunResult:
    seed: int
    records: list[FaultRecord] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    interrupted: bool = False
    unrecovered: int = 0
    crashes: list[str] = field(default_factory=list)
    campaigns_ended: bool = True
    checked: bool = False
    check_error: str | None = None
    history: Path | None = None

    def label(self, rec: FaultRecord) -> str:
        return label_of(rec.fault)

    def summary(self) -> dict[str, Any]:
        per: dict[str, list[float]] = {}
        for r in self.records:
            if r.recovery_s is not None:
                per.setdefault(label_of(r.fault), []).append(r.recovery_s)
        return {
            "faults": len(self.records), "seed": self.seed, "violations": len(self.violations),
            "violations_by_kind": by_kind(self.violations), "leftovers": self.leftovers,
            "unrecovered": self.unrecovered, "crashes": self.crashes, "interrupted": self.interrupted,
            "checked": self.checked,
            "check_error": self.check_error,
            "campaigns_ended": self.campaigns_ended,
            "recovery_s": {k: {"n": len(v), "p50": round(pct(v, 50), 3), "p99": round(pct(v, 99), 3),
                               "max": round(max(v), 3)} for k, v in sorted(per.items())},
            "history": str(self.history) if self.history else None,
        }


def label_of(fault: Fault) -> str:
    """The row of the summary table a fault counts in: its kind, with the daemon or infra kind."""
    what = getattr(fault, "daemon", "") or getattr(fault, "infra", "") or getattr(fault, "scope", "")
    return f"{fault.kind} {what}".strip()


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return float(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1])


def pom_reference(label: str) -> str:
    kind, _, what = label.partition(" ")
    secs = POM_SECONDS.get(what) or POM_SECONDS.get(kind)
    if secs is None:
        return "-"
    return f"{secs / 60:.0f} min" if secs >= 600 else f"{secs:.0f} s"


class Db:
    """One reconnecting connection (PostgreSQL itself is one of the faults)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: asyncpg.Connection | None = None
        self.offset = timedelta(0)  # database clock minus local clock

    async def get(self) -> asyncpg.Connection:
        if self.conn is None or self.conn.is_closed():
            self.conn = await asyncpg.connect(self.dsn, timeout=3)
        return self.conn

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        try:
            conn = await self.get()
            return list(await conn.fetch(sql, *args, timeout=5))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            await self.drop()
            raise

    async def drop(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.terminate()
        self.conn = None

    async def clock(self) -> tuple[datetime, str]:
        """The database clock; the local clock plus the measured offset while the database is down."""
        try:
            rows = await self.fetch("SELECT clock_timestamp() AS t")
            t: datetime = rows[0]["t"]
            self.offset = t - datetime.now(UTC)
            return t, "db"
        except Exception:
            return datetime.now(UTC) + self.offset, "offset"


SERVICES = (*SERVICE_OF.values(), "zone_director")


class Runner:
    def __init__(self, lab: LabControl, opts: RunOptions, echo: Callable[[str], None] = print) -> None:
        self.lab = lab
        self.topo = lab.topo
        self.opts = opts
        self.echo = echo
        self.rng = random.Random(opts.seed)
        self.db = Db(self.topo.postgres.dsn())
        self.active: list[Fault] = []
        self.result = RunResult(seed=opts.seed, history=opts.history)
        self.roles: list[tuple[str, str]] = []
        self.jobs: list[int] = []
        self.desktops: list[Any] = []
        self._lock = asyncio.Lock()
        self._count = 0
        self._deadline: float | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._heals: set[asyncio.Future[None]] = set()
        self._injected: list[Fault] = []  # every fault drawn; heal_all heals those still injected
        self._drain = False

    # ---- 1. refuse up front ----------------------------------------------------------------------------
    async def preflight(self) -> None:
        try:
            rows = await self.db.fetch("SELECT service, scope, holder_server FROM ha_lease"
                                       " WHERE expires_at > now() AND holder_server IS NOT NULL")
        except Exception as exc:
            raise RunRefused(f"the lab is not running: PostgreSQL at {self.topo.postgres.address}:"
                             f"{self.topo.postgres.port} does not answer ({type(exc).__name__})") from None
        missing = []
        for s in self.lab.servers:
            daemons = self.lab.daemons_on(s)
            if not daemons:
                missing.append(f"no pom-ha daemon was ever started on {s}")
            missing += [f"{d} on {s} is not running" for d in daemons if not self.lab.daemon_alive(d, s)]
        if isinstance(self.lab, ProcessLab):
            for kind in INFRA_KINDS:
                for s in self.lab.infra_on(kind):
                    if not self.lab.stack.launcher(kind, s).running():
                        missing.append(f"{kind} on {s} is not running")
        held = {r["service"] for r in rows}
        missing += [f"no {svc} master" for svc in ("rule_engine", "campaign_director") if svc not in held]
        if missing:
            raise RunRefused("the lab is not running as a whole (start it with: pom-ha lab up): "
                             + "; ".join(missing[:12]))
        reasons = refuse_impossible(self.lab, self.opts.kinds)
        if reasons:
            raise RunRefused("a fault is impossible on this topology: " + "; ".join(reasons))
        self.roles = sorted({(r["service"], r["scope"]) for r in rows if r["service"] in SERVICES})

    # ---- 2. the run's campaigns --------------------------------------------------------------------------
    async def start_campaigns(self, name: str) -> None:
        from pom_ha.campaign import admin
        from pom_ha.lab.platform import write_demo_csv

        if self.opts.contacts <= 0:
            return
        conn = await self.db.get()
        strategy = {"max_attempts": 2, "default_retry_interval_s": 3, "retry_intervals_s": {"BUSY": 2, "NO_ANSWER": 3}}
        plans: list[tuple[str, int, str | None]] = [(f"{name}-agentless", self.opts.contacts, None)]
        if self.opts.agents > 0 and isinstance(self.lab, ProcessLab):
            plans.append((f"{name}-agents", max(10, self.opts.contacts // 5), self.topo.zones[0].name))
        folder = self.topo.lab_dir() / "chaos"
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o755)
        imports = []
        for list_name, contacts, _zone in plans:
            csv_path = folder / f"{list_name}.csv"
            write_demo_csv(csv_path, contacts, seed=self.opts.seed)
            await admin.create_list(conn, list_name)
            imports.append((await admin.queue_import(conn, list_name, csv_path=str(csv_path))).id)
        deadline = time.monotonic() + 180
        while True:
            rows = await self.db.fetch("SELECT id, state, error FROM data_imports WHERE id = ANY($1::bigint[])",
                                       imports)
            if all(r["state"] == "completed" for r in rows):
                break
            failed = [r for r in rows if r["state"] == "failed"]
            if failed or time.monotonic() > deadline:
                raise RunRefused(f"the run's contact imports did not complete: {[dict(r) for r in rows]}")
            await asyncio.sleep(0.3)
        conn = await self.db.get()
        for list_name, _contacts, zone in plans:
            definition: dict[str, Any] = {"name": list_name, "contact_list": list_name, "strategy": strategy,
                                          "finish": {"all_contacts_done": True}}
            if zone is None:
                definition["pacing"] = {"calls_per_second": self.opts.calls_per_second}
                await admin.create_campaign(conn, definition)
            else:
                definition["pacing"] = {"kind": "predictive", "abandon_cap": 0.03}
                await admin.create_campaign(conn, definition, zone=zone)
            job = (await admin.start_campaign(conn, list_name)).id
            self.jobs.append(int(job))
            if zone is not None:
                self._start_desktops(zone, int(job), name)
        self.echo(f"campaigns: {', '.join(p[0] for p in plans)} started (jobs {self.jobs})")

    def _start_desktops(self, zone: str, job: int, name: str) -> None:
        from pom_ha.lab.daemons import start_daemon

        assert isinstance(self.lab, ProcessLab)
        server = self.lab.servers[-1]
        rec = start_daemon(self.topo, self.lab.topology_file, server, "desktop-simulator", "--zone", zone,
                           "--agents", str(self.opts.agents), "--job", str(job), "--agent-prefix", f"{name}-",
                           name=f"desktop-simulator-{name}")
        self.desktops.append(rec)

    def _stop_desktops(self) -> None:
        from pom_ha.infra.process import stop_process

        assert not self.desktops or isinstance(self.lab, ProcessLab)
        for rec in self.desktops:
            stop_process(rec, self.topo.lab_dir() / "run", timeout_s=10)
        self.desktops = []

    # ---- 3. faults ---------------------------------------------------------------------------------------
    async def masters(self) -> list[tuple[str, str]]:
        try:
            rows = await self.db.fetch("SELECT DISTINCT service, holder_server FROM ha_lease"
                                       " WHERE expires_at > now() AND holder_server IS NOT NULL")
        except Exception:
            return []
        return [(r["service"], r["holder_server"]) for r in rows]

    def excluded(self, fault: Fault) -> dict[str, set[str]]:
        """service -> servers whose instance cannot count as the recovered master."""
        if isinstance(fault, Partition) and fault.scope == "peers":
            return {}
        out: dict[str, set[str]] = {}
        for res, servers in fault.down(self.lab).items():
            if res.startswith("daemon:") and (svc := SERVICE_OF.get(res[7:])):
                if isinstance(fault, Partition) and isinstance(self.lab, ProcessLab):
                    from pom_ha.lab.platform import AS_OPERATOR

                    if res[7:] in AS_OPERATOR:  # runs as the operator, not the server's uid: not cut
                        continue
                out[svc] = set(servers)
                if svc == "campaign_director":  # the same daemon runs the zones' Zone Directors
                    out["zone_director"] = set(servers)
        return out

    async def recovered(self, fault: Fault) -> str | None:
        """None when the system has recovered from ``fault``; otherwise what is still missing."""
        excluded = self.excluded(fault)
        try:
            rows = await self.db.fetch("SELECT service, scope, holder_server, expires_at > now() AS valid"
                                       " FROM ha_lease")
            leases = {(r["service"], r["scope"]): r for r in rows}
            for role in self.roles:
                r = leases.get(role)
                if r is None or not r["valid"]:
                    return f"no master of {role[0]}/{role[1]}"
                if r["holder_server"] in excluded.get(role[0], set()):
                    return f"{role[0]}/{role[1]} still held by {r['holder_server']}"
            lost_cm = excluded.get("campaign_manager")
            if lost_cm:
                left = await self.db.fetch(
                    "SELECT a.item FROM ha_assignment a JOIN jobs j ON a.item = 'job:' || j.id"
                    " WHERE a.service = 'campaign_manager' AND a.owner_server = ANY($1::text[])"
                    " AND j.state NOT IN ('Completed', 'Stopped') LIMIT 1", sorted(lost_cm))
                if left:
                    return f"{left[0]['item']} still assigned to {sorted(lost_cm)}"
        except Exception as exc:  # the database is down or cut: not recovered yet
            return f"database: {type(exc).__name__}"
        for kind, servers in fault.down(self.lab).items():
            if kind in INFRA_KINDS and not await self.lab.infra_serving(kind, servers):
                return f"{kind} not serving without {sorted(servers)}"
        return None

    async def whole(self, fault: Fault) -> bool:
        for res, servers in fault.down(self.lab).items():
            if res in INFRA_KINDS and not await self.lab.infra_whole(res):
                return False
            if res.startswith("daemon:") and not all(self.lab.daemon_alive(res[7:], s) for s in servers):
                return False
        return True

    def _more(self) -> bool:
        if self._count >= self.opts.faults:
            return False
        return self._deadline is None or time.monotonic() < self._deadline

    def _pg_share(self) -> float:
        """The share of PostgreSQL restarts among the draws (its weight among the chosen kinds)."""
        if "postgres-restart" not in self.opts.kinds:
            return 0.0
        total = sum(WEIGHTS.get(k, 1.0) for k in self.opts.kinds)
        return WEIGHTS["postgres-restart"] / total

    async def worker(self, history: HistoryWriter) -> None:
        others = tuple(k for k in self.opts.kinds if k != "postgres-restart")
        while True:
            fault: Fault | None = None
            async with self._lock:
                if not self._more():
                    return
                if self._drain:
                    pass  # a PostgreSQL restart waits for the other faults to heal: draw nothing meanwhile
                elif not others or self.rng.random() < self._pg_share():
                    # it runs alone: without this drain it would never find a moment with nothing active
                    self._drain = True
                    fault = PostgresRestart()
                else:
                    fault = draw(self.rng, self.lab, others, self.active, await self.masters())
                if fault is not None:
                    self._count += 1
                    n = self._count
            if fault is None:
                await asyncio.sleep(0.5)
                continue
            if isinstance(fault, PostgresRestart):
                deadline = time.monotonic() + self.opts.whole_timeout_s * 2
                while self.active and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded poll
                    await asyncio.sleep(0.2)
            self.active.append(fault)
            self._injected.append(fault)
            try:
                await self.one(n, fault, history)
            finally:
                self.active.remove(fault)
                if isinstance(fault, PostgresRestart):
                    self._drain = False

    async def one(self, n: int, fault: Fault, history: HistoryWriter) -> None:
        at, clock = await self.db.clock()
        rec = FaultRecord(n, fault, at)
        t0 = time.monotonic()
        try:
            try:
                await fault.inject(self.lab)
                if isinstance(fault, PostgresRestart):
                    # nothing recovers while the database is down: the restart (heal) comes first, recovery after
                    await asyncio.sleep(self.rng.uniform(*self.opts.hold_s))
                    await self._heal(fault, rec)
                deadline = t0 + self.opts.recovery_timeout_s
                missing: str | None = "not checked"
                while time.monotonic() < deadline:
                    missing = await self.recovered(fault)
                    if missing is None:
                        rec.recovery_s = time.monotonic() - t0
                        rec.recovered_at = rec.injected_at + timedelta(seconds=rec.recovery_s)
                        break
                    await asyncio.sleep(0.1)
                if rec.recovery_s is None:
                    self.result.unrecovered += 1
                    rec.error = f"still missing: {missing}"
                await asyncio.sleep(self.rng.uniform(*self.opts.hold_s))
            except Exception as exc:
                rec.error = f"{type(exc).__name__}: {exc}"
        finally:
            heal = asyncio.ensure_future(self._heal(fault, rec))
            self._heals.add(heal)
            heal.add_done_callback(self._heals.discard)
            await asyncio.shield(heal)  # a cancel stops this wait, not the heal: heal_all waits for it
        healed, clock2 = await self.db.clock()
        rec.healed_at = healed
        deadline = time.monotonic() + self.opts.whole_timeout_s
        while not await self.whole(fault):
            if time.monotonic() > deadline:
                rec.error = (rec.error + "; " if rec.error else "") + "not whole again after the heal"
                break
            await asyncio.sleep(0.5)
        self.result.records.append(rec)
        history.fault({**fault.as_json(), "injected_at": rec.injected_at.isoformat(),
                       "recovered_at": rec.recovered_at.isoformat() if rec.recovered_at else None,
                       "recovery_s": None if rec.recovery_s is None else round(rec.recovery_s, 3),
                       "healed_at": healed.isoformat(), "clock": clock if clock == clock2 else "offset",
                       "error": rec.error})
        got = f"recovered in {rec.recovery_s:7.2f} s" if rec.recovery_s is not None else \
            f"NOT recovered within {self.opts.recovery_timeout_s:.0f} s"
        err = f"  ({rec.error})" if rec.error else ""
        self.echo(f"[{n:>4}/{self.opts.faults}] {fault.describe():<44} {got}{err}")

    async def _heal(self, fault: Fault, rec: FaultRecord | None = None) -> None:
        for attempt in range(3):
            try:
                await fault.heal(self.lab)
                return
            except Exception as exc:
                err = f"heal failed ({type(exc).__name__}: {exc})"
                if attempt == 2:
                    if rec is not None:
                        rec.error = (rec.error + "; " if rec.error else "") + err
                    self.echo(f"  {fault.describe()}: {err}")
                await asyncio.sleep(1.0)

    async def heal_all(self) -> None:
        if self._heals:
            await asyncio.gather(*self._heals, return_exceptions=True)
        for fault in list(self._injected):
            if fault.injected:
                await self._heal(fault)
        if isinstance(self.lab, ProcessLab) and self.lab.infra_on("ignite"):
            with contextlib.suppress(Exception):
                await self.lab.stack.heal_ignite(settle_s=60)

    async def watchdog(self) -> None:
        """The lab's supervisor (systemd's ``Restart=on-failure`` in a deployment): a daemon or server process
        that died while no fault of the run targets it crashed on its own; it is recorded as a finding
        (``crashes``) and started again, so the campaign goes on."""
        while True:
            await asyncio.sleep(2.0)
            busy: set[str] = set()
            for f in self.active:
                for servers in f.down(self.lab).values():
                    busy |= servers
            if any(getattr(f, "kind", "") == "postgres-restart" for f in self.active):
                continue
            for s in self.lab.servers:
                if s in busy:
                    continue
                dead = [d for d in self.lab.daemons_on(s) if not self.lab.daemon_alive(d, s)]
                if isinstance(self.lab, ProcessLab):
                    dead += [k for k in INFRA_KINDS if s in self.lab.infra_on(k)
                             and not self.lab.stack.launcher(k, s).running()]
                for what in dead:
                    at, _ = await self.db.clock()
                    note = f"{what}@{s} died without a fault at {at.isoformat()}; restarted"
                    self.result.crashes.append(note)
                    self.echo(f"CRASH {note}")
                    try:
                        if what in INFRA_KINDS:
                            await self.lab.start_infra(what, s)
                        else:
                            await self.lab.start_daemon(what, s)
                    except Exception as exc:
                        self.echo(f"  restart of {what}@{s} failed: {type(exc).__name__}: {str(exc)[:200]}")

    # ---- 4. end ------------------------------------------------------------------------------------------
    async def wait_campaigns(self) -> bool:
        if not self.jobs:
            return True
        deadline = time.monotonic() + self.opts.settle_timeout_s
        while time.monotonic() < deadline:
            try:
                rows = await self.db.fetch("SELECT id, state FROM jobs WHERE id = ANY($1::bigint[])", self.jobs)
                if all(r["state"] in FINAL for r in rows):
                    return True
            except Exception:
                pass
            await asyncio.sleep(1.0)
        return False

    async def run(self) -> RunResult:
        await self.preflight()
        name = f"chaos-{self.opts.seed}-{int(time.time())}"
        history = HistoryWriter(self.opts.history)
        main = asyncio.current_task()
        loop = asyncio.get_running_loop()
        interrupted: list[str] = []

        def on_signal(sig: signal.Signals) -> None:
            if not interrupted and main is not None:
                interrupted.append(sig.name)
                self.echo(f"{sig.name}: healing every fault, then exiting")
                main.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        conn = await self.db.get()
        try:
            started, _ = await self.db.clock()
            await self.start_campaigns(name)
            history.open({"lab": await lab_fingerprint(conn, self.topo), "seed": self.opts.seed,
                          "started_at": started.isoformat(), "jobs": self.jobs, "backend": self.lab.backend,
                          "params": {"faults": self.opts.faults, "concurrency": self.opts.concurrency,
                                     "minutes": self.opts.minutes, "kinds": list(self.opts.kinds)}})
            if self.opts.minutes is not None:
                self._deadline = time.monotonic() + self.opts.minutes * 60
            self._watchdog = asyncio.create_task(self.watchdog())
            workers = [asyncio.create_task(self.worker(history)) for _ in range(max(1, self.opts.concurrency))]
            try:
                await asyncio.gather(*workers)
            finally:
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
        except asyncio.CancelledError:
            self.result.interrupted = True
        finally:
            if self.result.interrupted and self._watchdog is not None:
                self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self.heal_all())
            self.result.leftovers = await asyncio.to_thread(self.lab.leftovers)
            self.lab.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        try:
            if not self.result.interrupted:
                self.echo("faults done: every fault healed; letting the run's campaigns finish")
                self.result.campaigns_ended = await self.wait_campaigns()
                await asyncio.sleep(3.0)  # events queued in the producers reach Kafka
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
                await asyncio.gather(self._watchdog, return_exceptions=True)
            self._stop_desktops()
            ended, _ = await self.db.clock()
            if history._out is not None:
                history.close({"ended_at": ended.isoformat(), "interrupted": self.result.interrupted,
                               "leftovers": self.result.leftovers})
        if self.opts.check and not self.result.interrupted:
            try:
                conn = await self.db.get()
                ev = await collect(conn, self.topo, jobs=self.jobs, since=started - timedelta(seconds=5),
                                   until=ended + timedelta(seconds=5))
                self.result.violations = judge(ev)
                self.result.checked = True
            except (OSError, RuntimeError, asyncpg.PostgresError) as exc:
                self.result.check_error = f"{type(exc).__name__}: {exc}"
                self.echo(f"the checker could not read the witnesses: {self.result.check_error}")
        await self.db.drop()
        return self.result


def render_summary(result: RunResult) -> str:
    from pom_ha.cli_support import table as _table

    per: dict[str, list[FaultRecord]] = {}
    for r in result.records:
        per.setdefault(label_of(r.fault), []).append(r)
    rows = []
    for label in sorted(per):
        recs = per[label]
        vals = [r.recovery_s for r in recs if r.recovery_s is not None]
        rows.append([label, str(len(recs)), str(len(vals)),
                     f"{pct(vals, 50):.2f}" if vals else "-", f"{pct(vals, 99):.2f}" if vals else "-",
                     pom_reference(label)])
    return _table(["FAULT", "N", "RECOVERED", "P50 S", "P99 S", "POM (GUIDE)"], rows)
