"""systemd readiness of a real daemon, without systemd: a Rule Engine started with ``NOTIFY_SOCKET`` pointing
at a socket of the test sends READY=1 only once its /health answers (Type=notify units rely on that), and
STOPPING=1 when SIGTERM begins its graceful stop."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import urllib.request
from pathlib import Path

import pytest

from pom_ha.config import REPO_ROOT
from pom_ha.infra.process import signal_process, start_process, stop_process
from pom_ha.infra.stack import Stack

pytestmark = pytest.mark.integration


async def _datagram(sock: socket.socket, timeout_s: float) -> bytes:
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout_s)


async def test_a_daemon_says_ready_once_its_health_answers_and_stopping_on_sigterm(
    stack: Stack, topology_file: Path, tmp_path: Path
) -> None:
    topo = stack.topo
    lab = topo.lab_dir()
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        rec = start_process(
            "re-notify-pom2", [sys.executable, "-m", "services.rule_engine", "--server", "pom2", "--topology",
                               str(topology_file)],
            run_dir=lab / "run", log_path=lab / "logs" / "re-notify-pom2.log", marker=str(topology_file),
            env={"PYTHONUNBUFFERED": "1", "NOTIFY_SOCKET": str(path)}, cwd=REPO_ROOT,
        )
        try:
            ready = await _datagram(sock, 90)
            assert ready.startswith(b"READY=1\n") and b"STATUS=running" in ready, ready
            url = f"http://{topo.server('pom2').address}:{topo.ports.metrics_rule_engine}/health"
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
            assert json.loads(body)["state"] == "running", "READY=1 comes after /health answers"
            assert signal_process(rec, signal.SIGTERM)
            stopping = await _datagram(sock, 30)
            assert stopping.startswith(b"STOPPING=1"), stopping
        finally:
            await asyncio.to_thread(stop_process, rec, lab / "run")
