"""``kafka sizing``: MB/hour x replication factor x retention, the guide's sample run as the worked example,
and clear errors for input that cannot be sized."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pom_ha.kafka.cli import kafka_group
from pom_ha.kafka.sizing import (
    GUIDE_TOPIC_MB_PER_HOUR,
    SizingError,
    SizingInput,
    TopicRate,
    compute,
    format_table,
    guide_example,
    load_input,
)


def test_the_guides_sample_run_at_the_default_retention() -> None:
    result = compute(guide_example())
    by_topic = {r.topic: r.disk_mb for r in result.rows}
    assert by_topic["POM.Default.AGENT"] == 255 * 3 * 168 == 128_520
    assert by_topic["POM.Default.ENRICHEDATTEMPTRESULT"] == 12 * 3 * 168
    assert result.produced_mb_per_hour == 707  # the guide's 859 total minus its 204 MB ZooKeeper directory row
    assert result.topics_mb == 707 * 3 * 168 == 356_328
    assert result.cluster_mb == 356_328 + 3 * 204
    assert result.per_broker_mb == 707 * 168 + 204
    table = format_table(result)
    assert "POM.Default.AGENTSTATISTICS" in table and "356,940" in table and "118,980" in table


def test_retention_and_replication_are_configurable() -> None:
    assert compute(guide_example(retention_hours=72)).topics_mb == 707 * 3 * 72
    assert compute(guide_example(replication_factor=1)).topics_mb == 707 * 168
    with pytest.raises(SizingError, match="replication factor 3 exceeds the 2 brokers"):
        compute(guide_example(brokers=2))


def test_toml_input_with_per_topic_replication_and_fixed_sizes(tmp_path: Path) -> None:
    path = tmp_path / "rates.toml"
    path.write_text(
        'retention_hours = 24\nbrokers = 5\n[topics]\n"POM.1.ATTEMPT" = 100\n'
        '"POM.1.JOB" = {mb_per_hour = 10, replication_factor = 5}\n[fixed_mb]\nzk = 50\n'
    )
    spec = load_input(path)
    result = compute(spec)
    assert [(r.topic, r.replication_factor, r.disk_mb) for r in result.rows] == [
        ("POM.1.ATTEMPT", 3, 100 * 3 * 24), ("POM.1.JOB", 5, 10 * 5 * 24)]
    assert result.cluster_mb == 7200 + 1200 + 5 * 50
    # the command line wins over the file
    assert compute(load_input(path, retention_hours=48)).topics_mb == 2 * (7200 + 1200)


def test_csv_input(tmp_path: Path) -> None:
    path = tmp_path / "rates.csv"
    path.write_text("topic,mb_per_hour,replication_factor\nPOM.Default.JOB,40,\nPOM.Default.AGENT,255,2\n")
    result = compute(load_input(path))
    assert [(r.topic, r.replication_factor) for r in result.rows] == [("POM.Default.JOB", 3), ("POM.Default.AGENT", 2)]
    assert result.topics_mb == (40 * 3 + 255 * 2) * 168


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("a.toml", '[topics]\n"T" = -1\n', r"topics\.T must be >= 0"),
        ("a.toml", '[topics]\n"T" = "fast"\n', r"topics\.T must be a number"),
        ("a.toml", "retention_hours = 0\n[topics]\nT = 1\n", "retention_hours must be > 0"),
        ("a.toml", "replication_factor = 2.5\n[topics]\nT = 1\n", "replication_factor must be a whole number"),
        ("a.toml", "retention = 5\n[topics]\nT = 1\n", "unknown key.*retention"),
        ("a.toml", "brokers = 3\n", r"a \[topics\] table"),
        ("a.toml", "[topics\n", "not valid TOML"),
        ("a.toml", '[topics]\nT = {rate = 3}\n', "expected {mb_per_hour"),
        ("a.csv", "topic,mb_per_hour\nT,1\nT,2\n", r"a\.csv:3: topic T listed twice"),
        ("a.csv", "topic,mb_per_hour\nT,lots\n", r"a\.csv:2: mb_per_hour must be a number"),
        ("a.csv", "name,rate\nT,1\n", "the header must name the columns"),
        ("a.csv", "topic,mb_per_hour\n", "no topics"),
        ("a.json", "{}", "expected a .toml or .csv file"),
    ],
)
def test_bad_input_names_the_file_and_field(tmp_path: Path, name: str, text: str, reason: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SizingError, match=reason) as err:
        compute(load_input(path))
    assert str(path) in str(err.value)


def test_missing_file_and_empty_input() -> None:
    with pytest.raises(SizingError, match=r"nope\.toml: cannot read"):
        load_input(Path("/nonexistent/nope.toml"))
    with pytest.raises(SizingError, match="no topics"):
        compute(SizingInput([]))
    with pytest.raises(SizingError, match="must be > 0"):
        compute(SizingInput([TopicRate("T", 1, 0)]))


def test_cli_example_json_and_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(kafka_group, ["sizing", "--example", "--retention-hours", "168", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output.splitlines()[-1])
    assert data["cluster_mb"] == 356_940 and data["retention_hours"] == 168
    assert [t["topic"] for t in data["topics"]] == list(GUIDE_TOPIC_MB_PER_HOUR)
    default = runner.invoke(kafka_group, ["sizing"])
    assert default.exit_code == 0 and "the guide's sample run" in default.output and "TOTAL (cluster)" in default.output
    bad = tmp_path / "bad.csv"
    bad.write_text("topic,mb_per_hour\nT,-3\n")
    res = runner.invoke(kafka_group, ["sizing", "--input", str(bad)])
    assert res.exit_code == 2 and "mb_per_hour must be >= 0" in res.output
    res = runner.invoke(kafka_group, ["sizing", "--example", "--input", str(bad)])
    assert res.exit_code == 2 and "exclude each other" in res.output
