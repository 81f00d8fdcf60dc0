"""Start and stop the lab's server processes, by PID only.

A started process gets its own session (so a signal to it never reaches us), its stdout/stderr go
to a log file, and a pid file records ``pid`` plus a marker that must appear in its command line.
``stop`` signals only a PID whose command line still carries that marker, so a recycled PID of some
other program is never touched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


class InfraError(Exception):
    """A server could not be started, reached, or stopped; the message says which and why."""


@dataclass(frozen=True)
class ProcessRecord:
    name: str
    pid: int
    marker: str
    log: str

    def alive(self) -> bool:
        return pid_matches(self.pid, self.marker)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def pid_matches(pid: int, marker: str) -> bool:
    """True when ``pid`` is a live process whose command line contains ``marker``.

    For a process this interpreter started, its ``Popen`` is the authority: ``/proc/<pid>/cmdline``
    reads empty for a moment while setpriv execs the real server.
    """
    if pid <= 0:
        return False
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    return not _is_zombie(pid) and marker in _cmdline(pid)


def start_process(
    name: str,
    argv: Sequence[str],
    *,
    run_dir: Path,
    log_path: Path,
    marker: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: tuple[int, int] | None = None,
) -> ProcessRecord:
    """Start ``argv`` detached; ``marker`` must be a string present in ``argv`` (usually a config path)."""
    if not any(marker in a for a in argv):
        raise InfraError(f"{name}: marker {marker!r} is not part of the command line")
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    argv = list(argv)
    if user is not None:
        uid, gid = user
        argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
        )
    rec = ProcessRecord(name=name, pid=proc.pid, marker=marker, log=str(log_path))
    (run_dir / f"{name}.pid").write_text(json.dumps(rec.__dict__))
    _CHILDREN[proc.pid] = proc
    return rec


# Popen objects of processes we started in this interpreter, so they can be reaped (no zombies).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _reap(pid: int) -> None:
    proc = _CHILDREN.get(pid)
    if proc is not None and proc.poll() is not None:
        _CHILDREN.pop(pid, None)


def read_record(run_dir: Path, name: str) -> ProcessRecord | None:
    path = run_dir / f"{name}.pid"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return ProcessRecord(**data)


def records(run_dir: Path) -> list[ProcessRecord]:
    out = []
    for p in sorted(run_dir.glob("*.pid")):
        rec = read_record(run_dir, p.stem)
        if rec:
            out.append(rec)
    return out


def signal_process(rec: ProcessRecord, sig: signal.Signals) -> bool:
    """Send ``sig`` to the recorded PID if it is still that process; True if sent."""
    if not rec.alive():
        return False
    try:
        os.kill(rec.pid, sig)
    except ProcessLookupError:
        return False
    return True


def wait_gone(rec: ProcessRecord, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(rec.pid)
        if not rec.alive():
            return True
        time.sleep(0.05)
    _reap(rec.pid)
    return not rec.alive()


def stop_process(rec: ProcessRecord, run_dir: Path | None = None, timeout_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``; removes the pid file. No-op when already gone."""
    if signal_process(rec, signal.SIGTERM) and not wait_gone(rec, timeout_s):
        signal_process(rec, signal.SIGKILL)
        wait_gone(rec, 5.0)
    if run_dir is not None:
        (run_dir / f"{rec.name}.pid").unlink(missing_ok=True)


def kill_process(rec: ProcessRecord) -> None:
    """SIGKILL (fault injection) and wait until the process is gone; keeps the pid file."""
    if signal_process(rec, signal.SIGKILL):
        wait_gone(rec, 10.0)


def log_tail(path: str | Path, lines: int = 40) -> str:
    try:
        data = Path(path).read_bytes()[-20000:].decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(data.splitlines()[-lines:])


def rss_mb(pid: int) -> float:
    """Resident memory of one process in MiB (0 when gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
