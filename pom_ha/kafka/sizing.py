"""``kafka sizing``: disk the Event SDK cluster needs for a retention period.

Each topic needs ``MB/hour * replication factor * retention hours`` across the cluster (one copy per
replica); fixed-size items such as the ZooKeeper data directory are added once per copy. The worked
example is the guide's sample run (four producers, 20 jobs, 1,000 agents, 67,000 attempts per hour):
its per-topic rates, replication factor 3 and the default retention of 168 hours.

Input files (``--input``) are TOML::

    retention_hours = 168        # optional; --retention-hours wins
    replication_factor = 3       # optional, default for every topic
    brokers = 3                  # optional, to print the share of one broker
    [topics]                     # MB/hour, or {mb_per_hour = 12, replication_factor = 3}
    "POM.Default.ATTEMPT" = 132
    [fixed_mb]                   # optional: sizes that do not grow with retention, one per broker
    "ZooKeeper data directory" = 204

or CSV with a header ``topic,mb_per_hour[,replication_factor]``.
"""

from __future__ import annotations

import csv
import io
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_RETENTION_HOURS = 168.0
DEFAULT_REPLICATION_FACTOR = 3
DEFAULT_BROKERS = 3

#: the guide's sample run: MB per hour of each Event SDK topic, and the ZooKeeper directory size
GUIDE_TOPIC_MB_PER_HOUR: dict[str, float] = {
    "POM.Default.AGENT": 255,
    "POM.Default.AGENTSTATISTICS": 255,
    "POM.Default.ATTEMPT": 132,
    "POM.Default.ENRICHEDATTEMPTRESULT": 12,
    "POM.Default.JOB": 40,
    "POM.Default.JOBSTATISTICS": 13,
}
GUIDE_FIXED_MB: dict[str, float] = {"ZooKeeper data directory": 204}


class SizingError(ValueError):
    """Bad sizing input; the message names the file and the field."""


@dataclass(frozen=True)
class TopicRate:
    topic: str
    mb_per_hour: float
    replication_factor: int


@dataclass(frozen=True)
class SizingInput:
    topics: list[TopicRate]
    retention_hours: float = DEFAULT_RETENTION_HOURS
    brokers: int = DEFAULT_BROKERS
    fixed_mb: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TopicDisk:
    topic: str
    mb_per_hour: float
    replication_factor: int
    retention_hours: float
    disk_mb: float


@dataclass(frozen=True)
class SizingResult:
    rows: list[TopicDisk]
    fixed_mb: dict[str, float]
    brokers: int
    retention_hours: float

    @property
    def produced_mb_per_hour(self) -> float:
        return sum(r.mb_per_hour for r in self.rows)

    @property
    def topics_mb(self) -> float:
        return sum(r.disk_mb for r in self.rows)

    @property
    def fixed_total_mb(self) -> float:
        return sum(self.fixed_mb.values()) * self.brokers

    @property
    def cluster_mb(self) -> float:
        return self.topics_mb + self.fixed_total_mb

    @property
    def per_broker_mb(self) -> float:
        """One broker's share when replicas are spread evenly (each broker holds topics/brokers)."""
        return self.topics_mb / self.brokers + sum(self.fixed_mb.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "retention_hours": self.retention_hours,
            "brokers": self.brokers,
            "topics": [r.__dict__ for r in self.rows],
            "fixed_mb": self.fixed_mb,
            "produced_mb_per_hour": self.produced_mb_per_hour,
            "cluster_mb": round(self.cluster_mb, 1),
            "cluster_gib": round(self.cluster_mb / 1024, 2),
            "per_broker_mb": round(self.per_broker_mb, 1),
            "per_broker_gib": round(self.per_broker_mb / 1024, 2),
        }


def _positive(source: str, name: str, value: object, *, integer: bool = False, zero_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SizingError(f"{source}: {name} must be a number, got {value!r}")
    if integer and not float(value).is_integer():
        raise SizingError(f"{source}: {name} must be a whole number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise SizingError(f"{source}: {name} must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")
    return float(value)


def compute(spec: SizingInput) -> SizingResult:
    """Disk per topic and in total; refuses values that cannot be sized."""
    if not spec.topics:
        raise SizingError("no topics to size")
    _positive("input", "retention_hours", spec.retention_hours)
    _positive("input", "brokers", spec.brokers, integer=True)
    rows = []
    for t in spec.topics:
        _positive("input", f"topics.{t.topic}", t.mb_per_hour, zero_ok=True)
        _positive("input", f"topics.{t.topic}.replication_factor", t.replication_factor, integer=True)
        if t.replication_factor > spec.brokers:
            raise SizingError(
                f"input: topics.{t.topic}: replication factor {t.replication_factor} exceeds the {spec.brokers} "
                "brokers (it must be less than or equal to the broker count)"
            )
        disk = t.mb_per_hour * t.replication_factor * spec.retention_hours
        rows.append(TopicDisk(t.topic, t.mb_per_hour, t.replication_factor, spec.retention_hours, disk))
    for name, mb in spec.fixed_mb.items():
        _positive("input", f"fixed_mb.{name}", mb, zero_ok=True)
    return SizingResult(rows, dict(spec.fixed_mb), spec.brokers, spec.retention_hours)


def guide_example(retention_hours: float = DEFAULT_RETENTION_HOURS, brokers: int = DEFAULT_BROKERS,
                  replication_factor: int = DEFAULT_REPLICATION_FACTOR) -> SizingInput:
    """The guide's sample run as input."""
    return SizingInput(
        [TopicRate(t, mb, replication_factor) for t, mb in GUIDE_TOPIC_MB_PER_HOUR.items()],
        retention_hours, brokers, dict(GUIDE_FIXED_MB),
    )


def load_input(path: Path, retention_hours: float | None = None, replication_factor: int | None = None,
               brokers: int | None = None) -> SizingInput:
    """Read a TOML or CSV rate file (by suffix); command-line values override the file's."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise SizingError(f"{path}: cannot read ({exc.strerror})") from None
    file_values: dict[str, Any] = {}
    fixed: dict[str, float] = {}
    if path.suffix.lower() == ".csv":
        topics = _parse_csv(str(path), text, replication_factor)
    elif path.suffix.lower() == ".toml":
        topics, file_values, fixed = _parse_toml(str(path), text, replication_factor)
    else:
        raise SizingError(f"{path}: expected a .toml or .csv file")
    if not topics:
        raise SizingError(f"{path}: no topics")
    retention = retention_hours if retention_hours is not None else file_values.get("retention_hours")
    count = brokers if brokers is not None else file_values.get("brokers")
    return SizingInput(
        topics,
        _positive(str(path), "retention_hours", retention) if retention is not None else DEFAULT_RETENTION_HOURS,
        int(_positive(str(path), "brokers", count, integer=True)) if count is not None else DEFAULT_BROKERS,
        fixed,
    )


def _parse_toml(source: str, text: str, rf_override: int | None
                ) -> tuple[list[TopicRate], dict[str, Any], dict[str, float]]:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SizingError(f"{source}: not valid TOML: {exc}") from None
    allowed = {"retention_hours", "replication_factor", "brokers", "topics", "fixed_mb"}
    extra = sorted(set(raw) - allowed)
    if extra:
        raise SizingError(f"{source}: unknown key(s) {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}")
    default_rf = rf_override or raw.get("replication_factor", DEFAULT_REPLICATION_FACTOR)
    default_rf = int(_positive(source, "replication_factor", default_rf, integer=True))
    table = raw.get("topics")
    if not isinstance(table, dict) or not table:
        raise SizingError(f"{source}: a [topics] table of 'topic = MB per hour' is required")
    topics = []
    for name, value in table.items():
        rf = default_rf
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"mb_per_hour", "replication_factor"})
            if unknown or "mb_per_hour" not in value:
                raise SizingError(f"{source}: topics.{name}: expected {{mb_per_hour = N, replication_factor = N}}")
            if rf_override is None and "replication_factor" in value:
                rf = int(_positive(source, f"topics.{name}.replication_factor", value["replication_factor"],
                                   integer=True))
            value = value["mb_per_hour"]
        topics.append(TopicRate(name, _positive(source, f"topics.{name}", value, zero_ok=True), rf))
    fixed_raw = raw.get("fixed_mb", {})
    if not isinstance(fixed_raw, dict):
        raise SizingError(f"{source}: fixed_mb must be a table of 'name = MB'")
    fixed = {k: _positive(source, f"fixed_mb.{k}", v, zero_ok=True) for k, v in fixed_raw.items()}
    return topics, {k: raw[k] for k in ("retention_hours", "brokers") if k in raw}, fixed


def _parse_csv(source: str, text: str, rf_override: int | None) -> list[TopicRate]:
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip() for f in reader.fieldnames or []]
    if "topic" not in fields or "mb_per_hour" not in fields:
        raise SizingError(f"{source}: the header must name the columns topic,mb_per_hour[,replication_factor]")
    topics: list[TopicRate] = []
    seen: set[str] = set()
    for lineno, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        name = row.get("topic", "")
        if not name:
            raise SizingError(f"{source}:{lineno}: empty topic name")
        if name in seen:
            raise SizingError(f"{source}:{lineno}: topic {name} listed twice")
        seen.add(name)
        rate = _number(f"{source}:{lineno}", "mb_per_hour", row.get("mb_per_hour", ""))
        rf_text = row.get("replication_factor", "")
        rf = rf_override or (int(_number(f"{source}:{lineno}", "replication_factor", rf_text, integer=True))
                             if rf_text else DEFAULT_REPLICATION_FACTOR)
        topics.append(TopicRate(name, rate, rf))
    return topics


def _number(source: str, name: str, text: str, integer: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SizingError(f"{source}: {name} must be a number, got {text!r}") from None
    return _positive(source, name, value, integer=integer, zero_ok=not integer)


def format_table(result: SizingResult) -> str:
    header = ["TOPIC", "MB/HOUR", "RF", "RETENTION H", "DISK MB", "DISK GiB"]
    rows = [[r.topic, f"{r.mb_per_hour:g}", str(r.replication_factor), f"{r.retention_hours:g}",
             f"{r.disk_mb:,.0f}", f"{r.disk_mb / 1024:,.1f}"] for r in result.rows]
    for name, mb in result.fixed_mb.items():
        total = mb * result.brokers
        rows.append([f"{name} (x{result.brokers} brokers)", "-", "-", "-", f"{total:,.0f}", f"{total / 1024:,.1f}"])
    rows.append(["TOTAL (cluster)", f"{result.produced_mb_per_hour:g}", "", "", f"{result.cluster_mb:,.0f}",
                 f"{result.cluster_mb / 1024:,.1f}"])
    rows.append([f"per broker (1/{result.brokers} of the replicas)", "", "", "",
                 f"{result.per_broker_mb:,.0f}", f"{result.per_broker_mb / 1024:,.1f}"])
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)
