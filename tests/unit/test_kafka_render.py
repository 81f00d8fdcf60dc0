"""``kafka enable-ha`` rendering and validation, and the TLS material it creates (no servers)."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12

from pom_ha.bench.isolated import isolated_topology
from pom_ha.config import DEFAULT_TOPOLOGY, ServerSection, Topology, load_topology
from pom_ha.infra.kafka import KafkaLauncher
from pom_ha.kafka.cli import kafka_group
from pom_ha.kafka.render import ExternalServer, RenderError, plan_cluster, read_properties, render_cluster
from pom_ha.kafka.tls import KafkaTlsError, Pki, ensure_pki, lab_pki, security_config, ssl_context


@pytest.fixture
def topo(tmp_path: Path) -> Topology:
    return isolated_topology(load_topology(DEFAULT_TOPOLOGY), block=40, lab_dir=str(tmp_path / "lab"))


def _five(topo: Topology) -> Topology:
    extra = [ServerSection(name=f"pom{i}", address=f"127.0.40.{i}", runs=["zookeeper", "kafka"]) for i in (4, 5)]
    return topo.model_copy(update={"servers": [*topo.servers, *extra]})


def test_three_brokers_get_myid_server_lines_broker_ids_and_rf3(topo: Topology, tmp_path: Path) -> None:
    out = tmp_path / "out"
    files = render_cluster(plan_cluster(topo, brokers=3), out)
    assert {f.path for f in files} >= {out / "pom2" / "kafka" / "conf" / "server.properties", out / "topology.toml"}
    for i, name in enumerate(["pom1", "pom2", "pom3"], start=1):
        assert (out / name / "zookeeper" / "data" / "myid").read_text().strip() == str(i)
        zoo = read_properties(out / name / "zookeeper" / "conf" / "zoo.cfg")
        assert [zoo[f"server.{n}"] for n in (1, 2, 3)] == [f"127.0.40.{n}:2888:3888" for n in (1, 2, 3)]
        props = read_properties(out / name / "kafka" / "conf" / "server.properties")
        assert props["broker.id"] == str(i)
        assert props["listeners"] == props["advertised.listeners"] == f"PLAINTEXT://127.0.40.{i}:9092"
        assert props["zookeeper.connect"].endswith("127.0.40.3:2181/pomha-kafka")
        for key in ("default.replication.factor", "offsets.topic.replication.factor",
                    "transaction.state.log.replication.factor"):
            assert props[key] == "3"
        assert props["min.insync.replicas"] == "2"
        assert not any(k.startswith("ssl.") for k in props)
    # the rendered topology starts exactly this cluster
    again = load_topology(out / "topology.toml")
    assert [s.name for s in again.servers_running("kafka")] == ["pom1", "pom2", "pom3"]
    assert again.lab_dir() == out.resolve() and not again.kafka.ssl


def test_five_brokers_and_an_external_server_keep_existing_ids(topo: Topology, tmp_path: Path) -> None:
    out = tmp_path / "out"
    plan = plan_cluster(_five(topo), brokers=5)
    render_cluster(plan, out)
    zoo = read_properties(out / "pom5" / "zookeeper" / "conf" / "zoo.cfg")
    assert sorted(k for k in zoo if k.startswith("server.")) == [f"server.{n}" for n in range(1, 6)]
    assert read_properties(out / "pom5" / "kafka" / "conf" / "server.properties")["default.replication.factor"] == "3"

    plan = plan_cluster(topo, servers=["pom1", "pom2"], externals=[ExternalServer.parse("kext=127.0.40.9")])
    assert [(s.name, plan.server_index(s.name), s.external) for s in plan.servers_running("kafka")] == [
        ("pom1", 1, False), ("pom2", 2, False), ("kext", 4, True)]
    assert plan.servers_running("zookeeper") == plan.servers_running("kafka")
    assert "kafka" not in plan.server("pom3").runs and "ignite" in plan.server("pom3").runs


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"servers": ["pom1", "pom2"]}, "at least 3 brokers"),
        ({"servers": ["pom1", "pom2", "pom3"], "externals": ["e=127.0.40.9"]}, "odd number of brokers.*got 4"),
        ({"servers": ["pom1", "pomX"]}, "unknown server.*pomX"),
        ({"servers": ["pom1"], "externals": ["e1=127.0.40.8", "e2=127.0.40.9"]}, "at most 1 external server.*e1, e2"),
        ({"brokers": 5}, "--brokers 5 does not match the 3"),
        ({"externals": ["pom1=127.0.40.9"]}, "already in the topology"),
        ({"servers": ["pom1", "pom2"], "externals": ["e=127.0.40.1"]}, "address already used"),
        ({"externals": ["nonsense"]}, "expected NAME=ADDRESS"),
        ({"externals": ["e=not-an-ip"]}, "not an IP address"),
    ],
)
def test_bad_input_is_refused_with_the_reason(topo: Topology, kwargs: dict[str, object], reason: str) -> None:
    args = dict(kwargs)
    externals = [str(e) for e in args.pop("externals", [])]  # type: ignore[attr-defined]
    with pytest.raises(RenderError, match=reason):
        plan_cluster(topo, externals=[ExternalServer.parse(e) for e in externals], **args)  # type: ignore[arg-type]


def test_an_external_server_in_the_topology_counts_against_the_limit(topo: Topology) -> None:
    servers = [*topo.servers[:2], topo.servers[2].model_copy(update={"external": True})]
    flagged = topo.model_copy(update={"servers": servers})
    with pytest.raises(RenderError, match=r"at most 1 external server.*pom3, e"):
        plan_cluster(flagged, servers=["pom1", "pom3"], externals=[ExternalServer.parse("e=127.0.40.9")])


def test_cli_refuses_an_even_count_and_writes_nothing(topo: Topology, tmp_path: Path) -> None:
    from pom_ha.config import dump_topology

    topo_file = dump_topology(_five(topo), tmp_path / "five.toml")
    out = tmp_path / "out"
    res = CliRunner().invoke(kafka_group, ["enable-ha", "--topology", str(topo_file), "--server", "pom1",
                                           "--server", "pom2", "--server", "pom3", "--server", "pom4",
                                           "--out", str(out)])
    assert res.exit_code == 2
    assert "odd number of brokers" in res.output and "nothing was written" in res.output
    assert not out.exists()


def test_cli_prints_every_file_written(topo: Topology, tmp_path: Path) -> None:
    from pom_ha.config import dump_topology

    topo_file = dump_topology(topo, tmp_path / "t.toml")
    out = tmp_path / "out"
    res = CliRunner().invoke(kafka_group, ["enable-ha", "--topology", str(topo_file), "--ssl", "--out", str(out)])
    assert res.exit_code == 0, res.output
    for path in ("pom1/zookeeper/data/myid", "pom3/zookeeper/conf/zoo.cfg", "pom2/kafka/conf/server.properties",
                 "ssl/ca.pem", "ssl/truststore.p12", "ssl/pom1.keystore.p12", "topology.toml"):
        assert str(out / path) in res.output, path
    assert Pki(out / "ssl").password() not in res.output


def test_ssl_render_switches_listeners_and_requires_client_auth(topo: Topology, tmp_path: Path) -> None:
    out = tmp_path / "out"
    plan = plan_cluster(topo, ssl=True)
    render_cluster(plan, out)
    conf = out / "pom2" / "kafka" / "conf"
    props = read_properties(conf / "server.properties")
    assert props["listeners"] == props["advertised.listeners"] == "SSL://127.0.40.2:9092"
    assert props["ssl.client.auth"] == "required"
    assert props["security.inter.broker.protocol"] == "SSL"
    assert props["ssl.keystore.type"] == props["ssl.truststore.type"] == "PKCS12"
    assert props["ssl.keystore.location"] == str(conf / "keystore.p12")
    assert stat.S_IMODE(os.stat(conf).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(conf / "keystore.p12").st_mode) == 0o600

    pki = lab_pki(plan, out.resolve())
    password = pki.password().encode()
    assert props["ssl.keystore.password"] == pki.password()
    key, cert, chain = pkcs12.load_key_and_certificates((conf / "keystore.p12").read_bytes(), password)
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    assert key is not None and cert is not None and [c.subject for c in chain] == [ca.subject]
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.40.2") in sans.get_values_for_type(x509.IPAddress)
    trusted = pkcs12.load_pkcs12((conf / "truststore.p12").read_bytes(), password)
    assert [c.certificate for c in trusted.additional_certs] == [ca]
    for private in (pki.ca_key, pki.password_file, pki.client_key, pki.keystore("pom1")):
        assert stat.S_IMODE(os.stat(private).st_mode) == 0o600, private


def test_client_settings_use_mutual_tls_only_in_ssl_mode(topo: Topology, tmp_path: Path) -> None:
    assert security_config(topo) == {}
    ssl_topo = topo.model_copy(update={"kafka": topo.kafka.model_copy(update={"ssl": True})})
    with pytest.raises(KafkaTlsError, match=r"ssl/ca\.pem: missing"):
        security_config(ssl_topo)
    pki = lab_pki(ssl_topo)
    ensure_pki(pki, [("pom1", "127.0.40.1")])
    conf = security_config(ssl_topo)
    assert conf["security.protocol"] == "SSL"
    assert conf["ssl.certificate.location"] == str(pki.client_cert)
    assert conf["ssl.key.location"] == str(pki.client_key)
    assert conf["ssl.ca.location"] == str(pki.ca_cert)
    ctx = ssl_context(ssl_topo)
    assert ctx.verify_mode.name == "CERT_REQUIRED"


def test_existing_material_is_kept_and_a_wrong_password_names_the_file(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "ssl")
    first = ensure_pki(pki, [("pom1", "127.0.40.1")])
    assert pki.ca_cert in first and pki.keystore("pom1") in first
    ca = pki.ca_cert.read_bytes()
    assert ensure_pki(pki, [("pom1", "127.0.40.1"), ("pom2", "127.0.40.2")]) == [pki.keystore("pom2")]
    assert pki.ca_cert.read_bytes() == ca
    pki.password_file.write_text("wrong\n")
    with pytest.raises(KafkaTlsError, match=r"ca\.key: cannot load the CA key \(wrong password"):
        ensure_pki(pki, [("pom3", "127.0.40.3")])
    pki.password_file.unlink()
    with pytest.raises(KafkaTlsError, match="store-password: cannot read"):
        pki.password()


def test_plaintext_launcher_render_is_unchanged(topo: Topology) -> None:
    broker = KafkaLauncher(topo, topo.servers[0])
    broker.prepare()
    text = broker.config_path.read_text()
    assert "listeners=PLAINTEXT://127.0.40.1:9092\n" in text
    assert "ssl." not in text and "$" not in text
    assert not (topo.lab_dir() / "ssl").exists()
