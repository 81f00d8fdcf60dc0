"""What deploy/ relies on, without a server: fixed metrics ports from the topology, the daemons' --http-port
default, sd_notify over a real unix datagram socket, the Prometheus targets of a topology, and install.sh's
refusals before it touches anything."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from pom_ha.config import REPO_ROOT, load_topology
from pom_ha.ha.daemon_cli import daemon_parser
from pom_ha.ha.sdnotify import notify
from pom_ha.infra.prometheus import scrape_targets, server_daemons


def test_every_daemon_has_its_own_fixed_metrics_port() -> None:
    ports = load_topology().ports
    fixed = ports.metrics_ports()
    assert set(fixed) == {"infra", "cache-service", "rule-engine", "campaign-director", "campaign-manager",
                          "agent-manager", "event-aggregator"}
    assert len(set(fixed.values())) == len(fixed), "two daemons of one server would collide"
    assert ports.metrics("rule-engine") == fixed["rule-engine"] == 9402
    assert ports.metrics("ha-probe") is None and ports.metrics("media-simulator") is None


def test_the_http_port_defaults_to_the_topology_and_0_stays_ephemeral() -> None:
    from pom_ha.ha.daemon_cli import load_daemon_context

    p = daemon_parser("campaign-manager", None, heartbeat=False)
    args = p.parse_args(["--server", "pom1"])
    load_daemon_context(args)
    assert args.http_port == 9404
    args = p.parse_args(["--server", "pom1", "--http-port", "0"])
    load_daemon_context(args)
    assert args.http_port == 0
    args = daemon_parser("ha-probe", None).parse_args(["--server", "pom1"])
    load_daemon_context(args)
    assert args.http_port == 0, "a daemon without a fixed port gets an ephemeral one"


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_sends_one_datagram_to_the_notify_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abstract: bool
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        if abstract:
            name = f"pomha-test-{os.getpid()}"
            sock.bind("\0" + name)
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        else:
            sock.bind(str(tmp_path / "notify"))
            monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        sock.settimeout(2)
        assert notify("READY=1", "STATUS=up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_sd_notify_outside_systemd_or_to_a_dead_socket_is_a_quiet_no(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not notify("READY=1")


def test_scrape_targets_follow_what_each_server_runs() -> None:
    topo = load_topology()
    groups = scrape_targets(topo)
    seen = {(g["labels"]["server"], g["labels"]["daemon"]): g["targets"] for g in groups}
    assert seen[("pom1", "rule-engine")] == [f"{topo.server('pom1').address}:9402"]
    assert seen[("pom3", "infra")] == [f"{topo.server('pom3').address}:9400"]
    assert len(groups) == 3 * 7
    no_ignite = topo.model_copy(update={"servers": [s.model_copy(update={"runs": ["zookeeper"]})
                                                     for s in topo.servers]})
    assert server_daemons(no_ignite, "pom1") == ["rule-engine", "campaign-director", "campaign-manager",
                                                 "agent-manager"], "no Ignite: no cache service; no Kafka: no EAA"


def _install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO_ROOT / "deploy" / "install.sh"), *args], capture_output=True, text=True,
                          timeout=60)


def test_install_sh_usage_and_bad_input_change_nothing(tmp_path: Path) -> None:
    res = _install()
    assert res.returncode == 2 and "--inventory" in res.stderr
    res = _install("--inventory", str(tmp_path / "missing.toml"), "--server", "pom1")
    assert res.returncode == 1 and res.stderr.startswith("error:") and "missing.toml" in res.stderr
    res = _install("--bogus")
    assert res.returncode == 2 and "unknown argument --bogus" in res.stderr
