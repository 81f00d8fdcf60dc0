"""deploy/prometheus on a real Prometheus (Debian's package): promtool accepts the config and rules and refuses a
broken rule; each alerting rule fires on the series of its fault and stays quiet on healthy ones (promtool test
rules); and a running Prometheus with that config scrapes real daemons at their fixed metrics ports: every
target up, the lease gauges queryable, the no-master rule quiet while a master exists."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from pom_ha.config import REPO_ROOT, load_topology
from pom_ha.infra.process import ProcessRecord, log_tail, start_process, stop_process
from pom_ha.infra.prometheus import DEPLOY_DIR, PrometheusLauncher, scrape_targets, write_config
from pom_ha.infra.stack import Stack
from pom_ha.lab.daemons import start_daemon

pytestmark = pytest.mark.integration
SERVERS = ("pom1", "pom2", "pom3")


def _promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.skip("promtool not installed: scripts/install installs Debian's prometheus package")
    return found


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_shipped_config_and_refuses_a_broken_rule(tmp_path: Path) -> None:
    promtool = _promtool()
    config = write_config(tmp_path / "ok", scrape_targets(load_topology()))
    res = _run(promtool, "check", "config", str(config))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr and "5 rules found" in res.stdout + res.stderr

    broken = tmp_path / "broken"
    write_config(broken, [])
    rules = (broken / "rules.yml").read_text()
    (broken / "rules.yml").write_text(rules.replace("sum by (service, scope) (pom_ha_role_master) < 1",
                                                    "sum by (service, scope (pom_ha_role_master) < 1"))
    res = _run(promtool, "check", "config", str(broken / "prometheus.yml"))
    assert res.returncode != 0 and "rules.yml" in res.stdout + res.stderr


RULE_TESTS = """
rule_files:
  - {rules}
evaluation_interval: 5s
tests:
  # a role held by nobody fires; a held role and a role held elsewhere do not (an empty scope is no label)
  - interval: 5s
    input_series:
      - series: 'pom_ha_role_master{{service="rule_engine", scope="", server="pom1"}}'
        values: '1 1 0 0 0 0 0 0 0'
      - series: 'pom_ha_role_master{{service="rule_engine", scope="", server="pom2"}}'
        values: '0x8'
      - series: 'pom_ha_role_master{{service="agent_manager", scope="Zone1", server="pom1"}}'
        values: '0 0 0 0 1 1 1 1 1'
      - series: 'pom_ha_role_master{{service="agent_manager", scope="Zone1", server="pom2"}}'
        values: '1 1 1 1 0 0 0 0 0'
    alert_rule_test:
      - eval_time: 5s
        alertname: PomRoleWithoutMaster
        exp_alerts: []
      - eval_time: 40s
        alertname: PomRoleWithoutMaster
        exp_alerts:
          - exp_labels: {{severity: critical, service: rule_engine}}
            exp_annotations:
              summary: "no master for rule_engine "
              description: "No daemon has held the rule_engine lease '' for 10 s (failover takes ~1 s)."
  # five new masters in 5 minutes flap; one takeover does not
  - interval: 30s
    input_series:
      - series: 'pom_ha_transitions_total{{service="campaign_director", scope="", kind="took_over", server="pom1"}}'
        values: '0 1 2 3 4 5 5 5 5 5 5'
      - series: 'pom_ha_transitions_total{{service="rule_engine", scope="", kind="took_over", server="pom1"}}'
        values: '0 1 1 1 1 1 1 1 1 1 1'
    alert_rule_test:
      - eval_time: 5m
        alertname: PomLeaseFlapping
        exp_alerts:
          - exp_labels: {{severity: warning, service: campaign_director}}
            exp_annotations:
              summary: "lease of campaign_director  flaps"
              description: "5 new masters of campaign_director '' within 5 minutes."
  # a job over its cap for a minute fires; a job under its cap does not
  - interval: 15s
    input_series:
      - series: 'pom_cm_abandon_rate{{job="7", server="pom1"}}'
        values: '0.05x8'
      - series: 'pom_cm_abandon_cap{{job="7", server="pom1"}}'
        values: '0.03x8'
      - series: 'pom_cm_abandon_rate{{job="8", server="pom2"}}'
        values: '0.02x8'
      - series: 'pom_cm_abandon_cap{{job="8", server="pom2"}}'
        values: '0.03x8'
    alert_rule_test:
      - eval_time: 30s
        alertname: PomAbandonRateOverCap
        exp_alerts: []
      - eval_time: 90s
        alertname: PomAbandonRateOverCap
        exp_alerts:
          - exp_labels: {{severity: critical, job: "7"}}
            exp_annotations:
              summary: "job 7 abandons over its cap"
              description: "Abandon rate 5% today is over the job's cap."
  # under-replicated partitions for a minute fire; none do not
  - interval: 15s
    input_series:
      - series: 'pom_ha_kafka_under_replicated_partitions{{server="pom1"}}'
        values: '0 0 0 0 0 0 0 0 0'
      - series: 'pom_ha_kafka_under_replicated_partitions{{server="pom2"}}'
        values: '0 4 4 4 4 4 4 4 4'
    alert_rule_test:
      - eval_time: 0s
        alertname: PomKafkaUnderReplicated
        exp_alerts: []
      - eval_time: 90s
        alertname: PomKafkaUnderReplicated
        exp_alerts:
          - exp_labels: {{severity: warning}}
            exp_annotations:
              summary: "Kafka has 4 under-replicated partitions"
              description: "In-sync replicas below replicas for a minute: a broker is down or lagging."
"""


def test_each_alert_fires_on_its_fault_and_stays_quiet_otherwise(tmp_path: Path) -> None:
    promtool = _promtool()
    tests = tmp_path / "rules_test.yml"
    tests.write_text(RULE_TESTS.format(rules=DEPLOY_DIR / "rules.yml"))
    res = _run(promtool, "test", "rules", str(tests))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr

    # the same tests against a rule that never fires must fail: the tests can see a rule that is wrong
    quiet = tmp_path / "quiet.yml"
    quiet.write_text((DEPLOY_DIR / "rules.yml").read_text().replace(
        "sum by (service, scope) (pom_ha_role_master) < 1", "sum by (service, scope) (pom_ha_role_master) < 0"))
    tests.write_text(RULE_TESTS.format(rules=quiet))
    res = _run(promtool, "test", "rules", str(tests))
    assert res.returncode != 0 and "PomRoleWithoutMaster" in res.stdout + res.stderr


async def _poll(check: Callable[[], Awaitable[Any]], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.5)
    raise AssertionError(f"not within {timeout_s:.0f} s: {what} (last: {last!r})")


@pytest.fixture
async def scraped(stack: Stack, topology_file: Path) -> AsyncIterator[PrometheusLauncher]:
    """Three Rule Engines and pom1's infra exporter at their fixed ports, and a Prometheus scraping them."""
    if not shutil.which("prometheus"):
        pytest.skip("prometheus not installed: scripts/install installs Debian's prometheus package")
    topo = stack.topo
    lab = topo.lab_dir()
    recs: list[ProcessRecord] = [start_daemon(topo, topology_file, s, "rule-engine") for s in SERVERS]
    recs.append(start_process(
        "infra-observe-pom1", [sys.executable, "-m", "pom_ha.cli", "infra", "observe", "--server", "pom1",
                               "--topology", str(topology_file)],
        run_dir=lab / "run", log_path=lab / "logs" / "infra-observe-pom1.log", marker=str(topology_file),
        env={"PYTHONUNBUFFERED": "1"}, cwd=REPO_ROOT,
    ))
    targets = scrape_targets(topo, {s: ["rule-engine"] for s in SERVERS}, infra=False)
    targets += [g for g in scrape_targets(topo, {"pom1": []}) if g["labels"]["server"] == "pom1"]
    prom = PrometheusLauncher(topo, targets)
    try:
        prom.start()
        await prom.wait_ready()
        yield prom
    finally:
        await asyncio.to_thread(prom.stop)
        for rec in recs:
            await asyncio.to_thread(stop_process, rec, lab / "run")
        shutil.rmtree(prom.home, ignore_errors=True)


async def test_prometheus_scrapes_every_daemon_at_its_fixed_port(scraped: PrometheusLauncher) -> None:
    prom = scraped
    ports = prom.topo.ports

    async def all_up() -> list[dict[str, Any]] | None:
        data = await prom.api("/api/v1/targets?state=active")
        active = (data or {}).get("activeTargets", [])
        if len(active) == 4 and all(t["health"] == "up" for t in active):
            return list(active)
        return None

    try:
        active = await _poll(all_up, 60, "4 targets (3 Rule Engines, pom1's infra exporter) all up")
    except AssertionError:
        raise AssertionError(f"{await prom.api('/api/v1/targets')}\n{log_tail(prom.log_path)}") from None
    assert {t["labels"]["daemon"] for t in active} == {"rule-engine", "infra"}
    assert {t["scrapeUrl"] for t in active if t["labels"]["daemon"] == "rule-engine"} == {
        f"http://{prom.topo.server(s).address}:{ports.metrics_rule_engine}/metrics" for s in SERVERS}

    async def one_master() -> list[dict[str, Any]] | None:
        data = await prom.api('/api/v1/query?query=pom_ha_role_master{service="rule_engine"}')
        series = (data or {}).get("result", [])
        masters = [s for s in series if s["value"][1] == "1"]
        return series if len(series) == 3 and len(masters) == 1 else None

    series = await _poll(one_master, 60, "a lease gauge per Rule Engine, exactly one of them master")
    assert {s["metric"]["server"] for s in series} == set(SERVERS)
    data = await prom.api("/api/v1/query?query=pom_ha_server_up")
    assert data is not None and data["result"], "the infra exporter's server gauges are scraped"
    rules = await prom.api("/api/v1/rules")
    names = {r["name"] for g in rules["groups"] for r in g["rules"]}
    assert {"PomRoleWithoutMaster", "PomLeaseFlapping", "PomAbandonRateOverCap", "PomKafkaUnderReplicated"} <= names

    # an evaluation before the first election left the alert pending; the next one after it clears it
    async def no_master_alert() -> bool:
        alerts = await prom.api("/api/v1/alerts")
        return alerts is not None and not [a for a in alerts["alerts"]
                                           if a["labels"]["alertname"] == "PomRoleWithoutMaster"
                                           and a["labels"].get("service") == "rule_engine"]

    assert await _poll(no_master_alert, 60, "no 'no master' alert for the Rule Engine once one is master")
