"""Topology loading: valid files load, bad ones are refused naming the file, field and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from pom_ha.bench.isolated import isolated_topology
from pom_ha.config import DEFAULT_TOPOLOGY, ConfigError, dump_topology, load_topology


def test_default_lab_topology_loads() -> None:
    topo = load_topology(DEFAULT_TOPOLOGY)
    assert [s.name for s in topo.servers] == ["pom1", "pom2", "pom3"]
    assert [s.address for s in topo.servers] == ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
    assert len(topo.servers_running("zookeeper")) == 3
    assert len(topo.servers_running("activemq")) == 2
    assert topo.server_index("pom3") == 3
    assert topo.server_uid("pom2") == topo.lab.uid_base + 2


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "topo.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[[servers]]\nname = "pom1"\naddress = "not-an-ip"\n', "servers.0.address"),
        ('[[servers]]\nname = "Pom 1"\naddress = "127.0.1.1"\n', "servers.0.name"),
        (
            '[[servers]]\nname = "a"\naddress = "127.0.1.1"\nruns = ["zookeeper"]\n'
            '[[servers]]\nname = "b"\naddress = "127.0.1.2"\nruns = ["zookeeper"]\n',
            "odd number",
        ),
        ('[[servers]]\nname = "a"\naddress = "127.0.1.1"\nruns = ["redis"]\n', "servers.0.runs.0"),
        ('[postgres]\nport = 99999\n[[servers]]\nname = "a"\naddress = "127.0.1.1"\n', "postgres.port"),
        ('[[servers]]\nname = "a"\naddress = "127.0.1.1"\ncolour = "red"\n', "servers.0.colour"),
        ("[[servers]\n", "not valid TOML"),
    ],
)
def test_invalid_topology_is_refused_with_file_and_field(tmp_path: Path, text: str, needle: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_topology(path)
    assert str(path) in str(err.value)
    assert needle in str(err.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such topology file"):
        load_topology(tmp_path / "nope.toml")


def test_password_is_never_in_repr_and_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POM_PG_PASSWORD", "s3cret-from-env")
    topo = load_topology(DEFAULT_TOPOLOGY)
    assert "s3cret-from-env" not in repr(topo)
    assert "s3cret-from-env" in topo.postgres.dsn()


def test_isolated_copy_round_trips_through_a_file(tmp_path: Path) -> None:
    topo = isolated_topology(load_topology(DEFAULT_TOPOLOGY), block=30, lab_dir=str(tmp_path / "lab"))
    assert [s.address for s in topo.servers] == ["127.0.30.1", "127.0.30.2", "127.0.30.3"]
    assert topo.postgres.address == "127.0.31.1"
    again = load_topology(dump_topology(topo, tmp_path / "t.toml"))
    assert again.servers == topo.servers
    assert again.postgres.dsn() == topo.postgres.dsn()
    assert again.lab_dir() == topo.lab_dir()
