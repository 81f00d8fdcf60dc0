"""The JSONL history of a chaos run: a header naming the lab and the run, one line per fault, an end line.

Every timestamp is the database clock's (``clock_timestamp()``), read when the fault was injected, recovered
and healed; while PostgreSQL itself is down the runner uses the local clock plus the offset it measured
against the database at the start, and marks the line ``"clock": "offset"``.

Lines::

    {"type": "header", "version": 1, "lab": {...}, "seed": 7, "started_at": "...", "jobs": [12, 13], ...}
    {"type": "fault", "n": 1, "kind": "daemon-kill", "target": "campaign-manager@pom2", "injected_at": "...",
     "recovered_at": "...", "recovery_s": 1.42, "healed_at": "...", "clock": "db", "error": null}
    {"type": "end", "faults": 25, "ended_at": "...", "interrupted": false, "leftovers": []}

:func:`read_history` refuses a file that is not such a history (no header, a line that is not JSON, no end
line or a fault count that does not match: a truncated file), with :class:`HistoryError`.
:func:`lab_fingerprint` names a lab by its database's first HA event, so a history of another lab is refused
by the checker rather than judged against the wrong tables.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

VERSION = 1


class HistoryError(Exception):
    """A history file that cannot be judged: missing, truncated, malformed or from another lab."""


@dataclass
class History:
    path: Path
    header: dict[str, Any]
    faults: list[dict[str, Any]]
    end: dict[str, Any]

    @property
    def started_at(self) -> datetime:
        return datetime.fromisoformat(self.header["started_at"])

    @property
    def ended_at(self) -> datetime:
        return datetime.fromisoformat(self.end["ended_at"])

    @property
    def jobs(self) -> list[int]:
        return [int(j) for j in self.header.get("jobs", [])]

    @property
    def lab(self) -> dict[str, Any]:
        lab: dict[str, Any] = self.header.get("lab", {})
        return lab


@dataclass
class HistoryWriter:
    """Appends lines and flushes each one; the end line is what makes the file complete."""

    path: Path
    faults: int = 0
    _out: TextIO | None = field(default=None, repr=False)

    def open(self, header: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._out = self.path.open("w")
        self._write({"type": "header", "version": VERSION, **header})

    def fault(self, line: dict[str, Any]) -> None:
        self.faults += 1
        self._write({"type": "fault", "n": self.faults, **line})

    def close(self, end: dict[str, Any]) -> None:
        self._write({"type": "end", "faults": self.faults, **end})
        if self._out is not None:
            self._out.close()
            self._out = None

    def _write(self, obj: dict[str, Any]) -> None:
        if self._out is None:
            raise HistoryError(f"{self.path}: history is not open")
        self._out.write(json.dumps(obj, default=str, separators=(",", ":")) + "\n")
        self._out.flush()
        os.fsync(self._out.fileno())


def read_history(path: Path | str) -> History:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise HistoryError(f"{path}: no such history file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HistoryError(f"{path}: cannot read it: {exc}") from None
    lines = text.splitlines()
    if not lines:
        raise HistoryError(f"{path}: empty file, not a chaos history")
    objs: list[dict[str, Any]] = []
    for i, line in enumerate(lines, start=1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            what = "truncated (its last line is cut)" if i == len(lines) else f"line {i} is not JSON"
            raise HistoryError(f"{path}: {what}: not a complete chaos history") from None
        if not isinstance(obj, dict) or "type" not in obj:
            raise HistoryError(f"{path}: line {i} is not a history record")
        objs.append(obj)
    header = objs[0]
    if header.get("type") != "header":
        raise HistoryError(f"{path}: the first line is not a chaos history header")
    if header.get("version") != VERSION:
        raise HistoryError(f"{path}: history version {header.get('version')!r}, this checker reads {VERSION}")
    for key in ("lab", "started_at", "seed"):
        if key not in header:
            raise HistoryError(f"{path}: the header has no {key!r}")
    end = objs[-1]
    if end.get("type") != "end" or len(objs) < 2:
        raise HistoryError(f"{path}: truncated: no end line (the run did not finish writing it)")
    faults = [o for o in objs[1:-1] if o.get("type") == "fault"]
    others = [o for o in objs[1:-1] if o.get("type") != "fault"]
    if others:
        raise HistoryError(f"{path}: unexpected {others[0].get('type')!r} line inside the history")
    if end.get("faults") != len(faults):
        raise HistoryError(f"{path}: truncated or edited: the end line counts {end.get('faults')} faults, "
                           f"the file holds {len(faults)}")
    numbers = [f.get("n") for f in faults]
    if numbers != list(range(1, len(faults) + 1)):
        raise HistoryError(f"{path}: fault lines are not numbered 1..{len(faults)} (lines missing or reordered)")
    try:
        datetime.fromisoformat(header["started_at"])
        datetime.fromisoformat(end["ended_at"])
    except (KeyError, TypeError, ValueError):
        raise HistoryError(f"{path}: started_at/ended_at are not timestamps") from None
    return History(path, header, faults, end)


async def lab_fingerprint(conn: Any, topo: Any) -> dict[str, Any]:
    """What names this lab: PostgreSQL's address and database, the POM servers, and the first HA event
    this database recorded (a new lab, a new database: a new first event)."""
    first = await conn.fetchrow("SELECT id, at FROM ha_event ORDER BY id LIMIT 1")
    return {
        "postgres": f"{topo.postgres.address}:{topo.postgres.port}/{topo.postgres.database}",
        "servers": [s.name for s in topo.servers],
        "first_ha_event": None if first is None else f"{first['id']}@{first['at'].isoformat()}",
    }


def same_lab(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The differences between a history's lab and this one (empty: the same lab)."""
    return [f"{k}: history {recorded.get(k)!r}, this lab {current.get(k)!r}"
            for k in ("postgres", "servers", "first_ha_event") if recorded.get(k) != current.get(k)]
