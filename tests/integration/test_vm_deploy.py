"""deploy/ on a real systemd: three "VMs" (containers whose PID 1 is Debian's systemd, built from the project
image by deploy/vm/Dockerfile) and a database/monitoring VM on a bridge network this test creates. Inside each
POM server VM `deploy/install.sh --inventory FILE --server pomN` installs user, folders, config and units;
`systemctl start pom-ha.target` brings up infra serve and every daemon (Type=notify: active means READY=1).
Then: the units' hardening is in force, a SIGKILLed daemon is restarted by systemd and its role comes back
DORMANT while another server holds it, and a Prometheus with deploy/prometheus's config scrapes every daemon
and every infra serve of the three VMs.

Needs a Docker engine (scripts/docker-engine ensure) and the project image (POM_VM_BASE_IMAGE, default
pom-ha:local, built by scripts/docker-lab build when missing); skipped with the reason otherwise. The bridge
network is POM_VM_SUBNET (default 172.29.0.0/16), created and removed here.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pom_ha.config import REPO_ROOT

pytestmark = pytest.mark.integration
T = TypeVar("T")

BASE_IMAGE = os.environ.get("POM_VM_BASE_IMAGE", "pom-ha:local")
VM_IMAGE = "pom-ha-vm:local"
SUBNET = ipaddress.ip_network(os.environ.get("POM_VM_SUBNET", "172.29.0.0/16"))
SERVERS = ("pom1", "pom2", "pom3")
PG_PASSWORD = "vm-" + uuid.uuid4().hex[:12]
PROM_PORT = 9090
POM = "/opt/pom-ha/.venv/bin/pom-ha"


def _docker(*args: str, timeout_s: float = 300, check: bool = True, input_text: str | None = None
            ) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout_s, input=input_text)
    except subprocess.TimeoutExpired:
        if check:
            raise
        # a poll's check on a starved host: "not yet", asked again until the poll's own deadline
        return subprocess.CompletedProcess(["docker", *args], 124, "", f"timed out after {timeout_s:.0f} s")
    if check and res.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])}... failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    return res


def _poll(check: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.5) -> T:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(interval_s)


def _engine_or_skip() -> None:
    if shutil.which("docker") and _docker("info", check=False, timeout_s=30).returncode == 0:
        return
    if os.geteuid() == 0:
        res = subprocess.run([str(REPO_ROOT / "scripts" / "docker-engine"), "ensure"], capture_output=True,
                             text=True, timeout=900)
        if res.returncode == 0 and _docker("info", check=False, timeout_s=30).returncode == 0:
            return
        pytest.skip(f"no Docker engine and scripts/docker-engine ensure could not start one: {res.stderr[-300:]}")
    pytest.skip("no Docker engine running and not root to start one (scripts/docker-engine ensure)")


def _base_image_or_skip() -> None:
    if _docker("image", "inspect", BASE_IMAGE, check=False).returncode == 0:
        return
    lab = REPO_ROOT / "scripts" / "docker-lab"
    if BASE_IMAGE != "pom-ha:local" or not lab.exists():
        pytest.skip(f"the project image {BASE_IMAGE} is missing and this checkout cannot build it "
                    "(scripts/docker-lab build)")
    res = subprocess.run([str(lab), "build"], capture_output=True, text=True, timeout=1800, cwd=REPO_ROOT)
    if res.returncode != 0:
        pytest.fail(f"scripts/docker-lab build failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")


def _build_vm_image() -> None:
    """deploy/vm/Dockerfile from a context of just the files it copies (not .venv, .jvm, .lab)."""
    with tempfile.TemporaryDirectory(prefix="pomha-vm-ctx-") as ctx:
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPO_ROOT / name, ctx)
        for name in ("pom_ha", "services", "config", "deploy", "scripts"):
            shutil.copytree(REPO_ROOT / name, Path(ctx) / name, ignore=shutil.ignore_patterns("__pycache__"))
        _docker("build", "--network", "host", "--build-arg", f"BASE={BASE_IMAGE}", "-f", "deploy/vm/Dockerfile",
                "-t", VM_IMAGE, ctx, timeout_s=900)


@dataclass
class VM:
    name: str  # container name
    host: str  # pom1 / db
    address: str

    def sh(self, script: str, *, timeout_s: float = 180, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _docker("exec", "-i", self.name, "bash", "-euo", "pipefail", "-s", timeout_s=timeout_s, check=check,
                       input_text=script)

    def out(self, script: str, **kw: Any) -> str:
        return self.sh(script, **kw).stdout.strip()

    def pom_ha(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.sh(f"set -a; . /etc/pom-ha/env; set +a; {POM} {' '.join(args)}", check=False)

    def unit(self, unit: str, prop: str) -> str:
        return self.out(f"systemctl show -p {prop} --value {unit}")

    def journal(self, unit: str, lines: int = 30) -> str:
        return self.out(f"journalctl -u {unit} --no-pager -n {lines} || true", check=False)


@dataclass
class Cluster:
    db: VM
    servers: dict[str, VM]
    inventory: str


# The servers each VM runs. Default: a ZooKeeper ensemble (infra serve, a quorum across the VMs) and an Ignite
# cluster (the cache service's nodes), so the test fits its time budget on a 2-core machine; POM_VM_FULL=1 runs
# the guide's layout (Kafka on the three, the ActiveMQ pair, and then the Enriched Attempt Aggregator too).
FULL = bool(os.environ.get("POM_VM_FULL"))
RUNS = {s: ["zookeeper"] + (["kafka"] if FULL else []) + ["ignite"] + (["activemq"] if FULL and s != "pom3" else [])
        for s in SERVERS}
HA_DAEMONS = ["cache-service", "rule-engine", "campaign-director", "campaign-manager", "agent-manager"] + (
    ["event-aggregator"] if FULL else [])


def _inventory(addresses: dict[str, str], db: str) -> str:
    servers = "".join(f'\n[[servers]]\nname = "{s}"\naddress = "{addresses[s]}"\nruns = {json.dumps(RUNS[s])}\n'
                      for s in SERVERS)
    return (f'[lab]\ndir = "/var/lib/pom-ha"\n\n[postgres]\naddress = "{db}"\nport = 5432\ndatabase = "pomha"\n'
            f'user = "pomha"\n{servers}\n[[zones]]\nname = "Default"\n\n[[zones]]\nname = "Zone1"\n')


def _database_vm(db: VM, servers_net: str) -> None:
    """Debian's PostgreSQL cluster on the database VM, listening on its address for the POM servers."""
    db.sh(f"""
        systemctl unmask postgresql.service postgresql@15-main.service >/dev/null 2>&1
        printf "listen_addresses = '{db.address}'\\nport = 5432\\nmax_connections = 400\\nfsync = off\\n" \\
            > /etc/postgresql/15/main/conf.d/pomha.conf
        echo "host pomha pomha {servers_net} scram-sha-256" >> /etc/postgresql/15/main/pg_hba.conf
        systemctl start postgresql@15-main
        runuser -u postgres -- psql -qc "CREATE ROLE pomha LOGIN PASSWORD '{PG_PASSWORD}'" \\
            -c "CREATE DATABASE pomha OWNER pomha"
    """, timeout_s=120)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    _engine_or_skip()
    _base_image_or_skip()
    _build_vm_image()
    tag = uuid.uuid4().hex[:6]
    net = f"pomha-vmtest-{tag}"
    hosts = list(SUBNET.hosts())
    addresses = {"db": str(hosts[9]), **{s: str(hosts[10 + i]) for i, s in enumerate(SERVERS)}}
    vms: list[VM] = []
    _docker("network", "create", "--subnet", str(SUBNET), "--label", "pom-ha.test=vm-deploy", net)
    try:
        for host, address in addresses.items():
            vm = VM(f"{net}-{host}", host, address)
            _docker("run", "-d", "--name", vm.name, "--hostname", host, "--network", net, "--ip", address,
                    "--label", "pom-ha.test=vm-deploy", "--cap-add", "SYS_ADMIN", "-e", "container=docker",
                    "--tmpfs", "/run", "--tmpfs", "/run/lock", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro", VM_IMAGE)
            vms.append(vm)
        for vm in vms:
            _poll(lambda vm=vm: vm.out("systemctl is-system-running || true", check=False) in ("running", "degraded"),
                  60, f"systemd of {vm.host} running")
        db, servers = vms[0], {vm.host: vm for vm in vms[1:]}
        _database_vm(db, str(SUBNET))
        yield Cluster(db, servers, _inventory(addresses, addresses["db"]))
    finally:
        names = [vm.name for vm in vms]
        if os.environ.get("POM_KEEP_VMS"):  # debugging: inspect with docker exec, then remove them by hand
            print(f"kept VMs {names} on network {net}")
        else:
            if names:
                _docker("rm", "-f", *names, check=False, timeout_s=180)
            _docker("network", "rm", net, check=False)


def _install(vm: VM, inventory: str, server: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    vm.sh(f"cat > /root/inventory.toml <<'EOF'\n{inventory}EOF\n"
          f"umask 077; echo '{PG_PASSWORD}' > /root/pg-password")
    return vm.sh(f"/opt/pom-ha/deploy/install.sh --inventory /root/inventory.toml --server {server} "
                 "--pg-password-file /root/pg-password", check=check)


def _status(vm: VM) -> dict[str, Any] | None:
    res = vm.pom_ha("status", "--json")
    if res.returncode != 0:
        return None
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def _holder(vm: VM, service: str) -> str | None:
    """The server holding ``service``'s singleton lease (read from the lease table on the database clock)."""
    res = vm.sh(f"""set -a; . /etc/pom-ha/env; set +a
        /opt/pom-ha/.venv/bin/python - <<'EOF'
import asyncio, asyncpg
from pom_ha.config import load_topology
async def main():
    conn = await asyncpg.connect(load_topology().postgres.dsn(), timeout=5)
    try:
        print(await conn.fetchval("SELECT holder_server FROM ha_lease WHERE service = $1 AND scope = ''"
                                  " AND expires_at > now()", "{service}") or "")
    finally:
        await conn.close()
asyncio.run(main())
EOF""", check=False)
    return res.stdout.strip() or None if res.returncode == 0 else None


def test_install_refuses_an_unknown_server_and_changes_nothing(cluster: Cluster) -> None:
    vm = cluster.servers["pom1"]
    res = _install(vm, cluster.inventory, "pom9", check=False)
    assert res.returncode == 1
    assert "error:" in res.stderr and "pom9" in res.stderr
    assert vm.out("test -e /etc/pom-ha/env && echo yes || echo no") == "no"
    assert vm.out("id pomha >/dev/null 2>&1 && echo yes || echo no") == "no"


@pytest.mark.skipif(os.environ.get("POM_CONTAINER_TESTS") != "1",
                    reason="the systemd kill-and-restart run is a separate command until its one flaky step (a "
                           "`docker exec` into pom2 that once failed with no output) is explained: "
                           "POM_CONTAINER_TESTS=1 .venv/bin/pytest tests/integration/test_vm_deploy.py")
@pytest.mark.timeout(1500)  # generous: on a loaded 2-core host the containers get little CPU
def test_systemd_runs_the_server_restarts_a_killed_daemon_dormant_and_prometheus_scrapes_it(
    cluster: Cluster,
) -> None:
    t0 = time.monotonic()
    for name, vm in cluster.servers.items():
        out = _install(vm, cluster.inventory, name).stdout
        assert "units enabled" in out and "done" in out, out
    pom1 = cluster.servers["pom1"]
    assert pom1.out("stat -c '%a %U' /etc/pom-ha/env") == "600 root"
    assert pom1.out("stat -c '%a %U:%G' /etc/pom-ha/cluster.toml") == "640 root:pomha"
    assert PG_PASSWORD not in pom1.out("cat /etc/pom-ha/cluster.toml")
    for vm in cluster.servers.values():
        vm.sh("systemctl start --no-block pom-ha.target")

    # ---- systemd brings every unit to active (Type=notify: after the daemon's READY=1) --------------------------
    units = ["pom-ha-migrate.service", "pom-ha-infra.service",
             *(f"pom-ha@{d}.service" for d in [*HA_DAEMONS, "media-simulator", "rest-api"])]

    def all_active() -> bool:
        for vm in cluster.servers.values():
            states = vm.out(f"systemctl is-active {' '.join(units)} || true", check=False).split()
            failed = [u for u, s in zip(units, states, strict=False) if s == "failed"]
            assert not failed, f"{vm.host}: {failed} failed:\n{vm.journal(failed[0])}"
            if any(s != "active" for s in states):
                return False
        return True

    try:
        _poll(all_active, 900, "every pom-ha unit active on the three VMs", interval_s=2)
    except AssertionError:
        for vm in cluster.servers.values():
            print(vm.out("systemctl list-units 'pom-ha*' --no-pager || true", check=False))
        print(pom1.journal("pom-ha-infra.service", 60))
        raise
    up_s = time.monotonic() - t0

    services = {"cache_service", "rule_engine", "campaign_director", "zone_director", "campaign_manager",
                "agent_manager"} | ({"event_aggregator"} if FULL else set())
    elected = {"rule_engine": 1, "campaign_director": 1, "zone_director": 2, "agent_manager": 2,
               "event_aggregator": 1}

    last: list[Any] = [None]

    def complete() -> dict[str, Any] | None:
        """Every component on every server (a starved host may show a row late: no staleness check), each
        elected role scope held exactly once."""
        doc = last[0] = _status(pom1)
        comps = (doc or {}).get("components", {})
        if not services <= set(comps):
            return None
        for service in services:
            cells = comps[service]
            if set(cells) != set(SERVERS) or any(c["state"] == "STOPPED" for c in cells.values()):
                return None
            masters = [c for c in cells.values() if c["state"] == "MASTER"]
            held = sum(max(1, len(c["scopes"])) for c in masters)
            if service in elected and held != elected[service]:
                return None
        return doc

    try:
        table = _poll(complete, 300, "the component table complete, every elected role with a master")
    except AssertionError:
        raise AssertionError(f"last component table: {json.dumps(last[0])}") from None
    print(f"VMs up in {up_s:.0f} s; component table: {json.dumps(table)}")

    # ---- the hardening is in force inside the units (not skipped as "containerized") ----------------------------
    vm = cluster.servers["pom2"]
    pid = vm.unit("pom-ha@rule-engine.service", "MainPID")
    assert vm.out(f"stat -c %U /proc/{pid}") == "pomha"
    status = vm.out(f"cat /proc/{pid}/status")
    assert "NoNewPrivs:\t1" in status and "CapEff:\t0000000000000000" in status
    mounts = {line.split()[4]: line.split()[5] for line in
              vm.out(f"runuser -u pomha -- cat /proc/{pid}/mountinfo").splitlines()}
    assert mounts["/"].startswith("ro"), mounts
    assert mounts["/var/lib/pom-ha"].startswith("rw") and mounts["/var/log/pom-ha"].startswith("rw"), mounts
    assert "/tmp" in mounts, "PrivateTmp: the unit has its own /tmp"
    node = vm.out("pgrep -u pomha -f CommandLineStartup | head -n1")
    assert node, "the cache service's Ignite node runs as pomha"
    assert "pom-ha@cache-service.service" in vm.out(f"cat /proc/{node}/cgroup"), "inside the cache service's unit"

    # ---- SIGKILL the Rule Engine master's main process: systemd restarts it, it comes back DORMANT -------------------
    victim_name = _poll(lambda: _holder(pom1, "rule_engine"), 30, "a Rule Engine master")
    victim = cluster.servers[victim_name]
    unit = "pom-ha@rule-engine.service"
    old_pid, restarts = victim.unit(unit, "MainPID"), int(victim.unit(unit, "NRestarts"))
    victim.sh(f"kill -KILL {old_pid}")

    def restarted() -> str | None:
        pid = victim.unit(unit, "MainPID")
        active = victim.out(f"systemctl is-active {unit} || true", check=False) == "active"
        return pid if active and pid not in ("0", old_pid) else None

    new_pid = _poll(restarted, 60, f"systemd restarted {unit} on {victim_name} (READY=1 again)")
    assert int(victim.unit(unit, "NRestarts")) == restarts + 1
    assert "status=9/KILL" in victim.journal(unit, 80)
    holder = _poll(lambda: (h := _holder(pom1, "rule_engine")) and h != victim_name and h, 30,
                   "the Rule Engine lease held by another server")

    def dormant_again() -> dict[str, Any] | None:
        res = victim.sh(f"{POM.removesuffix('pom-ha')}python -c \"import urllib.request,sys;sys.stdout.write("
                        f"urllib.request.urlopen('http://{victim.address}:9402/health', timeout=2).read().decode())\"",
                        check=False)
        health: dict[str, Any] = json.loads(res.stdout) if res.returncode == 0 else {}
        return health if health.get("role") == "DORMANT" and health.get("state") == "running" else None

    health = _poll(dormant_again, 60, f"the restarted Rule Engine on {victim_name} DORMANT, {holder} master")
    assert health["server"] == victim_name
    assert victim.unit(unit, "MainPID") == new_pid, "no second restart"

    # ---- a Prometheus on the database VM scrapes every daemon and every infra serve of the three VMs -------------
    db = cluster.db
    db.sh(f"cat > /root/inventory.toml <<'EOF'\n{cluster.inventory}EOF")
    db.sh(f"{POM} prometheus config /var/lib/pomha-prometheus --topology /root/inventory.toml")
    db.sh(f"systemd-run --unit pomha-prometheus --property User=prometheus --property StateDirectory=pomha-prom "
          f"prometheus --config.file=/var/lib/pomha-prometheus/prometheus.yml --storage.tsdb.path=/var/lib/pomha-prom "
          f"--web.listen-address={db.address}:{PROM_PORT}")
    api = f"http://{db.address}:{PROM_PORT}/api/v1"
    py = "/opt/pom-ha/.venv/bin/python"

    def get(path: str) -> Any:
        res = db.sh(f"{py} -c \"import urllib.request,sys;sys.stdout.write(urllib.request.urlopen("
                    f"'{api}{path}', timeout=3).read().decode())\"", check=False)
        return json.loads(res.stdout)["data"] if res.returncode == 0 else None

    def all_up() -> list[dict[str, Any]] | None:
        data = get("/targets?state=active")
        active = (data or {}).get("activeTargets", [])
        return active if len(active) == n_targets and all(t["health"] == "up" for t in active) else None

    n_targets = 3 * (1 + len(HA_DAEMONS))
    try:
        active = _poll(all_up, 90, f"{n_targets} targets (infra serve and every HA daemon of each VM) all up")
    except AssertionError:
        raise AssertionError(json.dumps(get("/targets"), indent=1)[:4000]) from None
    assert {(t["labels"]["server"], t["labels"]["daemon"]) for t in active} == {
        (s, d) for s in SERVERS for d in ["infra", *HA_DAEMONS]}

    def lease_series() -> list[dict[str, Any]] | None:
        data = get("/query?query=pom_ha_role_master%7Bservice%3D%22rule_engine%22%7D")
        result = (data or {}).get("result", [])
        masters = [r["metric"]["server"] for r in result if r["value"][1] == "1"]
        return result if len(result) == 3 and masters == [holder] else None

    _poll(lease_series, 60, f"pom_ha_role_master of the three Rule Engines, {holder} the master")
    servers_up = get("/query?query=sum%20by%20(server)%20(pom_ha_server_up)")
    assert servers_up and {r["metric"]["server"]: r["value"][1] for r in servers_up["result"]} == {
        s: str(len(RUNS[s]) - 1) for s in SERVERS}, servers_up  # every kind but Ignite (the cache service's)
    print(f"whole test {time.monotonic() - t0:.0f} s after the VMs booted")
