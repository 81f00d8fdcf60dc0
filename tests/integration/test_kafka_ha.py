"""The Kafka HA commands on real servers: ``enable-ha`` renders what the lab's brokers run with, ``verify``
passes on the healthy cluster (leader stop and ISR rejoin included) and fails naming the row with a broker
down, and an SSL-mode cluster rendered by ``enable-ha --ssl`` serves mutual-TLS clients only."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, ConfigResource  # type: ignore[attr-defined]
from confluent_kafka.cimpl import NewTopic

from pom_ha.config import Topology, dump_topology, load_topology
from pom_ha.infra.base import Launcher
from pom_ha.infra.kafka import KafkaLauncher, bootstrap_servers, broker_ids
from pom_ha.infra.stack import Stack
from pom_ha.infra.zookeeper import ZooKeeperLauncher
from pom_ha.kafka.cli import kafka_group
from pom_ha.kafka.render import plan_cluster, read_properties, render_cluster
from pom_ha.kafka.tls import lab_pki, security_config
from pom_ha.kafka.verify import registered_broker_ids

pytestmark = pytest.mark.integration

STEP_S = 120.0
#: the SSL cluster runs beside the session stack on the same addresses, on ports shifted by this much
SSL_PORT_SHIFT = 100
ClientConfig = dict[str, str | int | float | bool]


def _invoke(args: list[str]) -> Result:
    return CliRunner().invoke(kafka_group, args, catch_exceptions=False)


def _row(output: str, name: str) -> str:
    """The status column of the table row called ``name``."""
    for line in output.splitlines():
        if line.startswith(name + "  "):
            return line[len(name):].split()[0]
    raise AssertionError(f"no row {name!r} in:\n{output}")


async def _poll(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if await asyncio.to_thread(predicate):  # type: ignore[arg-type]
                return
        except KafkaException:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout_s:.0f} s")
        await asyncio.sleep(0.25)


def _isr_complete(topo: Topology) -> bool:
    admin = AdminClient({**security_config(topo), "bootstrap.servers": bootstrap_servers(topo)})
    md = admin.list_topics(timeout=10)
    brokers = broker_ids(topo)
    return set(md.brokers) == brokers and all(
        set(p.isrs) == set(p.replicas) for t in md.topics.values() for p in t.partitions.values()
    )


# ---- enable-ha against the running lab -------------------------------------------------------------
async def test_enable_ha_renders_the_settings_the_running_brokers_use(stack: Stack, tmp_path: Path) -> None:
    plan = plan_cluster(stack.topo, brokers=3)
    render_cluster(plan, tmp_path)
    path_keys = {"log.dirs", "dataDir"}
    for launcher in stack.launchers("kafka"):
        assert isinstance(launcher, KafkaLauncher)
        rendered = read_properties(tmp_path / launcher.server.name / "kafka" / "conf" / "server.properties")
        running = read_properties(launcher.config_path)
        assert {k: v for k, v in rendered.items() if k not in path_keys} == {
            k: v for k, v in running.items() if k not in path_keys
        }
        assert rendered["broker.id"] == str(launcher.broker_id)
        assert rendered["listeners"] == f"PLAINTEXT://{launcher.endpoint}"
        for key in ("default.replication.factor", "offsets.topic.replication.factor",
                    "transaction.state.log.replication.factor"):
            assert rendered[key] == "3", key
        assert rendered["min.insync.replicas"] == "2"
    for zk in stack.launchers("zookeeper"):
        assert isinstance(zk, ZooKeeperLauncher)
        home = tmp_path / zk.server.name / "zookeeper"
        assert (home / "data" / "myid").read_text().strip() == str(zk.myid)
        rendered, running = read_properties(home / "conf" / "zoo.cfg"), read_properties(zk.config_path)
        assert {k: v for k, v in rendered.items() if k not in path_keys} == {
            k: v for k, v in running.items() if k not in path_keys
        }
        assert sorted(k for k in rendered if k.startswith("server.")) == ["server.1", "server.2", "server.3"]

    # and the live brokers report those values themselves
    admin = AdminClient({"bootstrap.servers": bootstrap_servers(stack.topo)})
    for broker in sorted(broker_ids(stack.topo)):
        res = ConfigResource(ConfigResource.Type.BROKER, str(broker))
        configs = (await asyncio.to_thread(admin.describe_configs([res])[res].result, 30))
        live = {k: v.value for k, v in configs.items()}
        assert live["broker.id"] == str(broker)
        assert live["default.replication.factor"] == "3"
        assert live["offsets.topic.replication.factor"] == "3"
        assert live["min.insync.replicas"] == "2"


# ---- verify ----------------------------------------------------------------------------------------
async def test_verify_passes_on_the_healthy_cluster_including_leader_stop_and_isr_rejoin(
    stack: Stack, topology_file: Path
) -> None:
    res = await asyncio.to_thread(_invoke, ["verify", "--topology", str(topology_file), "--create-topics",
                                            "--timeout", str(STEP_S)])
    print(res.output)
    assert res.exit_code == 0, res.output
    for name in ("brokers registered in ZooKeeper", "clients reach the brokers (plaintext)",
                 "topic POM.Default.JOB exists",
                 "topic POM.Default.ENRICHEDATTEMPTRESULT exists", "replicas spread over all brokers",
                 "every ISR complete", "leader stop moves leadership", "stopped broker leaves every ISR",
                 "restarted broker rejoins every ISR"):
        assert _row(res.output, name) == "PASS", name
    assert "FAIL" not in res.output and "Kafka HA verified" in res.output
    assert all(k.running() for k in stack.launchers("kafka")), "verify must leave every broker running"


async def test_verify_fails_naming_the_row_when_a_broker_is_down(stack: Stack, topology_file: Path) -> None:
    victim = stack.launchers("kafka")[1]
    victim_id = stack.topo.server_index(victim.server.name)
    await asyncio.to_thread(victim.stop)
    try:
        await _poll(lambda: victim_id not in registered_broker_ids(stack.topo), 30, "broker deregistered")
        res = await asyncio.to_thread(_invoke, ["verify", "--topology", str(topology_file), "--create-topics"])
        print(res.output)
        assert res.exit_code == 1, res.output
        assert _row(res.output, "brokers registered in ZooKeeper") == "FAIL"
        assert f"broker(s) {victim_id} not registered" in res.output
        assert _row(res.output, "every ISR complete") == "FAIL"
        # an unhealthy cluster is not disturbed further
        assert _row(res.output, "leader stop moves leadership") == "SKIP"
        assert "FAILED: brokers registered in ZooKeeper" in res.output
    finally:
        victim.start()
        await victim.wait_ready()
        await _poll(lambda: _isr_complete(stack.topo), STEP_S, "every ISR complete again")


# ---- SSL ---------------------------------------------------------------------------------------------
@pytest.fixture
async def ssl_cluster(stack: Stack) -> AsyncIterator[Topology]:
    """A second 3-node ZooKeeper + 3-broker cluster in SSL mode, rendered by ``enable-ha --ssl``."""
    lab = tempfile.mkdtemp(prefix="pomha-kafka-ssl-")
    os.chmod(lab, 0o755)  # the servers run under their own uids
    p = stack.topo.ports
    ports = p.model_copy(update={"zookeeper_client": p.zookeeper_client + SSL_PORT_SHIFT,
                                 "zookeeper_peer": p.zookeeper_peer + SSL_PORT_SHIFT,
                                 "zookeeper_election": p.zookeeper_election + SSL_PORT_SHIFT,
                                 "kafka": p.kafka + SSL_PORT_SHIFT})
    base = stack.topo.model_copy(update={"ports": ports, "lab": stack.topo.lab.model_copy(update={"dir": lab})})
    base_file = dump_topology(base, Path(lab) / "base-topology.toml")
    res = await asyncio.to_thread(_invoke, ["enable-ha", "--topology", str(base_file), "--ssl", "--out", lab])
    assert res.exit_code == 0, res.output
    topo = load_topology(Path(lab) / "topology.toml")
    assert topo.kafka.ssl
    assert lab_pki(topo).password() not in res.output, "the store password must never be printed"
    started: list[Launcher] = []
    try:
        zookeepers: list[Launcher] = [ZooKeeperLauncher(topo, s) for s in topo.servers_running("zookeeper")]
        brokers: list[Launcher] = [KafkaLauncher(topo, s) for s in topo.servers_running("kafka")]
        for group in (zookeepers, brokers):
            for launcher in group:
                launcher.start()
                started.append(launcher)
            await asyncio.gather(*(launcher.wait_ready() for launcher in group))
        yield topo
    finally:
        for launcher in reversed(started):
            await asyncio.to_thread(launcher.stop)
        shutil.rmtree(lab, ignore_errors=True)


def _produce(config: ClientConfig, topic: str, n: int) -> set[str]:
    acked: set[str] = set()

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is None:
            acked.add((msg.key() or b"").decode())

    producer = Producer({**config, "acks": "all", "enable.idempotence": True, "message.timeout.ms": 60_000})
    for k in range(n):
        producer.produce(topic, key=str(k).encode(), value=f"event {k}".encode(), on_delivery=on_delivery)
    producer.flush(70.0)
    return acked


def _consume(config: ClientConfig, topic: str, expected: set[str], timeout_s: float) -> set[str]:
    consumer = Consumer({**config, "group.id": f"pomha-ssl-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    try:
        consumer.subscribe([topic])
        while not expected <= seen and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                seen.add((msg.key() or b"").decode())
    finally:
        consumer.close()
    return seen


def _refused(config: ClientConfig) -> list[str]:
    """What a client is told when it asks for metadata; raises AssertionError if it got an answer."""
    errors: list[str] = []
    admin = AdminClient({**config, "log_level": 0}, error_cb=lambda err: errors.append(str(err)))
    with pytest.raises(KafkaException) as refused:
        admin.list_topics(timeout=8)
    errors.append(str(refused.value))
    deadline = time.monotonic() + 10
    while len(errors) < 2 and time.monotonic() < deadline:  # connection errors reach error_cb through poll
        admin.poll(0.5)
    return errors


async def test_ssl_cluster_serves_mutual_tls_clients_and_refuses_a_client_without_certificate(
    ssl_cluster: Topology,
) -> None:
    topo = ssl_cluster
    props = read_properties(topo.lab_dir() / "pom1" / "kafka" / "conf" / "server.properties")
    assert props["listeners"].startswith("SSL://") and props["ssl.client.auth"] == "required"
    assert props["security.inter.broker.protocol"] == "SSL"
    secure: ClientConfig = {**security_config(topo), "bootstrap.servers": bootstrap_servers(topo)}
    assert secure["security.protocol"] == "SSL"

    admin = AdminClient(secure)
    topic = f"pomha-ssl-{uuid.uuid4().hex[:8]}"
    created = admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=3)])
    await asyncio.to_thread(created[topic].result, 30)
    acked = await asyncio.to_thread(_produce, secure, topic, 50)
    assert len(acked) == 50
    assert await asyncio.to_thread(_consume, secure, topic, acked, 60.0) == acked

    # a client that trusts the CA but has no certificate of its own: the handshake is refused
    no_cert: ClientConfig = {"bootstrap.servers": bootstrap_servers(topo), "security.protocol": "SSL",
               "ssl.ca.location": str(lab_pki(topo).ca_cert)}
    errors = await asyncio.to_thread(_refused, no_cert)
    print("client without certificate:", errors[:2])
    assert any("bad certificate" in e for e in errors), errors[:5]
    # and a plaintext client gets nothing either
    print("plaintext client:", (await asyncio.to_thread(_refused, {"bootstrap.servers": bootstrap_servers(topo)}))[:2])

    # verify reaches the SSL cluster over mutual TLS, and a broker restarted by it comes back in SSL mode
    res = await asyncio.to_thread(_invoke, ["verify", "--topology", str(topo.lab_dir() / "topology.toml"),
                                            "--create-topics", "--timeout", str(STEP_S)])
    print(res.output)
    assert res.exit_code == 0, res.output
    assert _row(res.output, "clients reach the brokers (mutual TLS)") == "PASS"
    assert _row(res.output, "restarted broker rejoins every ISR") == "PASS"
    with contextlib.suppress(KafkaException):
        await asyncio.to_thread(admin.delete_topics([topic])[topic].result, 30)
