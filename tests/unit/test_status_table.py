"""The component table's rendering (pure): states, zones, pool load, stale members, unknown servers."""

from __future__ import annotations

from pom_ha.status import build_table


def rec(service: str, server: str, state: str, scopes: list[str] | None = None, load: int = 0,
        age_s: float = 0.2) -> dict[str, object]:
    return {"service": service, "server": server, "state": state, "scopes": scopes or [], "load": load,
            "age_s": age_s}


def test_rows_are_components_and_columns_servers() -> None:
    table = build_table([
        rec("rule_engine", "pom1", "MASTER", [""]), rec("rule_engine", "pom2", "DORMANT"),
        rec("zone_director", "pom2", "MASTER", ["Z1", "Z2"]), rec("zone_director", "pom1", "DORMANT"),
        rec("campaign_manager", "pom1", "RUNNING", load=3), rec("campaign_manager", "pom3", "STOPPED", age_s=99),
        rec("campaign_director", "pom1", "MASTER", [""]),
    ], ["pom1", "pom2", "pom3"])
    assert table.header() == ["COMPONENT", "pom1", "pom2", "pom3"]
    lines = table.lines(stale_after_s=5)
    assert [line[0] for line in lines] == ["Campaign Director", "Zone Director", "Campaign Manager", "Rule Engine"]
    assert lines[0] == ["Campaign Director", "MASTER", "-", "-"]
    assert lines[1] == ["Zone Director", "DORMANT", "MASTER (Z1, Z2)", "-"]
    assert lines[2] == ["Campaign Manager", "RUNNING (load 3)", "-", "STOPPED"]
    assert lines[3] == ["Rule Engine", "MASTER", "DORMANT", "-"]


def test_a_member_not_seen_for_long_is_marked_gone_with_its_last_state() -> None:
    table = build_table([rec("rule_engine", "pom1", "MASTER", [""], age_s=12.4)], ["pom1"])
    assert table.lines(stale_after_s=5) == [["Rule Engine", "GONE? MASTER (12 s)"]]
    assert table.lines(stale_after_s=30) == [["Rule Engine", "MASTER"]]
    doc = table.as_json(stale_after_s=5)
    assert doc["components"]["rule_engine"]["pom1"]["stale"] is True


def test_servers_outside_the_topology_are_shown_after_it() -> None:
    table = build_table([rec("ha_probe_x", "pom9", "DORMANT"), rec("ha_probe_x", "pom1", "MASTER")], ["pom1"])
    assert table.header() == ["COMPONENT", "pom1", "pom9"]
    assert table.lines(5) == [["ha_probe_x", "MASTER", "DORMANT"]]
