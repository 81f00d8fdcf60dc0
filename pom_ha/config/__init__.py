"""Typed settings: the lab/cluster topology (``config/*.toml``) and the HA timing rules.

Every setting carries its unit in its name. Environment variables ``POM_*`` override single values
(``POM_PG_PASSWORD``, ``POM_LAB_DIR``). A bad file is refused with the file, the field and the reason.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TOPOLOGY = REPO_ROOT / "config" / "lab.toml"

ServerKind = Literal["zookeeper", "kafka", "ignite", "activemq"]


class ConfigError(Exception):
    """A configuration file or value that cannot be used; the message names file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _loopback_or_host(value: str) -> str:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IP address") from exc
    return str(ip)


class LabSection(_Strict):
    dir: str = ".lab"
    uid_base: int = Field(20000, ge=1000, le=60000)


class PostgresSection(_Strict):
    address: str = "127.0.2.1"
    port: int = Field(5432, ge=1, le=65535)
    database: str = "pomha"
    user: str = "pomha"
    password: SecretStr = SecretStr("pomha-lab")

    _addr = field_validator("address")(_loopback_or_host)

    def dsn(self) -> str:
        return (
            f"postgresql://{self.user}:{self.password.get_secret_value()}"
            f"@{self.address}:{self.port}/{self.database}"
        )


class PortsSection(_Strict):
    zookeeper_client: int = 2181
    zookeeper_peer: int = 2888
    zookeeper_election: int = 3888
    kafka: int = 9092
    ignite_discovery: int = 47500
    ignite_communication: int = 47100
    ignite_thin_client: int = 10800
    activemq_openwire: int = 61616
    activemq_stomp: int = 61613
    # pom-ha's own service ports (each daemon binds its POM server's address)
    rule_engine: int = 7300
    media_simulator: int = 7400
    desktop: int = 7500
    console: int = 8080
    rest_api: int = 8090
    # fixed /health + /metrics port of each daemon on its server's address (Prometheus scrapes them;
    # deploy/prometheus); `--http-port 0` still asks for an ephemeral one
    metrics_infra: int = 9400
    metrics_cache_service: int = 9401
    metrics_rule_engine: int = 9402
    metrics_campaign_director: int = 9403
    metrics_campaign_manager: int = 9404
    metrics_agent_manager: int = 9405
    metrics_event_aggregator: int = 9406
    # the lab's Prometheus, on the PostgreSQL host's address (pom_ha/infra/prometheus.py)
    prometheus: int = 9090

    def metrics(self, daemon: str) -> int | None:
        """The fixed metrics port of ``daemon`` (``rule-engine``, ``infra``...), None if it has none."""
        port = getattr(self, "metrics_" + daemon.replace("-", "_"), None)
        return port if isinstance(port, int) else None

    def metrics_ports(self) -> dict[str, int]:
        """Every daemon's fixed metrics port, by daemon name (``rule-engine``)."""
        return {k.removeprefix("metrics_").replace("_", "-"): v for k, v in self.model_dump().items()
                if k.startswith("metrics_")}


class KafkaSection(_Strict):
    """Event SDK cluster settings. ``ssl``: brokers listen on SSL only and require a client certificate
    (mutual TLS); the lab creates its CA and stores under ``<lab dir>/ssl`` (see pom_ha.kafka.ssl)."""

    ssl: bool = False


class WebSection(_Strict):
    """The web daemon (REST API + console, pom_ha/web). ``tls_cert``/``tls_key``: PEM files; both set ->
    HTTPS only (and the session cookie is Secure). ``open_health_on_loopback``: /healthz and /metrics
    answer loopback clients without a session or token."""

    tls_cert: str = ""
    tls_key: str = ""
    open_health_on_loopback: bool = True
    session_ttl_s: float = Field(8 * 3600.0, ge=60, le=30 * 86400)

    @model_validator(mode="after")
    def _pair(self) -> WebSection:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("web: tls_cert and tls_key go together (both set, or neither)")
        return self


class ServerSection(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,30}$")
    address: str
    runs: list[ServerKind] = Field(default_factory=list)
    external: bool = False

    _addr = field_validator("address")(_loopback_or_host)


class ZoneSection(_Strict):
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")
    org: str = "Default"


class Topology(_Strict):
    lab: LabSection = LabSection()
    postgres: PostgresSection = PostgresSection()
    ports: PortsSection = PortsSection()
    kafka: KafkaSection = KafkaSection()
    web: WebSection = WebSection()
    servers: list[ServerSection]
    zones: list[ZoneSection] = Field(default_factory=lambda: [ZoneSection(name="Default")])
    source: str = ""

    @model_validator(mode="after")
    def _check(self) -> Topology:
        names = [s.name for s in self.servers]
        if not names:
            raise ValueError("servers: at least one server is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"servers: names must be unique, got {names}")
        addrs = [s.address for s in self.servers] + [self.postgres.address]
        if len(set(addrs)) != len(addrs):
            raise ValueError(f"servers.address: every server and postgres need their own address, got {addrs}")
        zk = self.servers_running("zookeeper")
        if zk and len(zk) % 2 == 0:
            raise ValueError(f"servers.runs: a ZooKeeper ensemble needs an odd number of nodes, got {len(zk)}")
        if self.servers_running("kafka") and not zk:
            raise ValueError("servers.runs: kafka needs zookeeper on at least one server")
        if len(self.servers_running("activemq")) > 2:
            raise ValueError("servers.runs: the lab runs at most two ActiveMQ brokers (master and slave)")
        if len([s for s in self.servers if s.external]) > 1:
            raise ValueError("servers.external: at most one external server")
        return self

    def servers_running(self, kind: ServerKind) -> list[ServerSection]:
        return [s for s in self.servers if kind in s.runs]

    def server(self, name: str) -> ServerSection:
        for s in self.servers:
            if s.name == name:
                return s
        raise ConfigError(f"{self.source}: unknown server {name!r}; known: {[s.name for s in self.servers]}")

    def server_index(self, name: str) -> int:
        """1-based position of a server in the file: its ZooKeeper myid, Kafka broker.id, uid offset."""
        return [s.name for s in self.servers].index(name) + 1

    def lab_dir(self) -> Path:
        raw = os.environ.get("POM_LAB_DIR", self.lab.dir)
        p = Path(raw)
        return p if p.is_absolute() else (REPO_ROOT / p)

    def server_uid(self, name: str) -> int:
        return self.lab.uid_base + self.server_index(name)


def load_topology(path: str | Path | None = None) -> Topology:
    """Read and validate a topology file (default ``config/lab.toml``)."""
    path = Path(path or os.environ.get("POM_TOPOLOGY") or DEFAULT_TOPOLOGY)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such topology file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    if pw := os.environ.get("POM_PG_PASSWORD"):
        raw.setdefault("postgres", {})["password"] = pw
    raw["source"] = str(path)
    try:
        return Topology.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from None


def format_validation_error(path: Path | str, exc: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(file)"
        lines.append(f"  {field}: {err['msg']}")
    return "\n".join(lines)


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, SecretStr):
        v = v.get_secret_value()
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def dump_topology(topo: Topology, path: Path) -> Path:
    """Write ``topo`` as a topology file (used to hand an isolated lab's topology to daemons)."""
    out: list[str] = []
    for section in ("lab", "postgres", "ports", "kafka", "web"):
        out.append(f"[{section}]")
        model = getattr(topo, section)
        for key in type(model).model_fields:
            out.append(f"{key} = {_toml_value(getattr(model, key))}")
        out.append("")
    for table, items in (("servers", topo.servers), ("zones", topo.zones)):
        for item in items:
            out.append(f"[[{table}]]")
            for key in type(item).model_fields:
                out.append(f"{key} = {_toml_value(getattr(item, key))}")
            out.append("")
    path.write_text("\n".join(out))
    path.chmod(0o644)
    return path
