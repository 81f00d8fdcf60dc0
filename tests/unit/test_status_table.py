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


def test_a_member_not_seen_for_long_is_marked_unreachable_with_its_last_state() -> None:
    table = build_table([rec("rule_engine", "pom1", "MASTER", [""], age_s=12.4)], ["pom1"])
    assert table.lines(stale_after_s=5) == [["Rule Engine", "UNREACHABLE (was MASTER, 12 s)"]]
    assert table.lines(stale_after_s=30) == [["Rule Engine", "MASTER"]]
    doc = table.as_json(stale_after_s=5)
    assert doc["components"]["rule_engine"]["pom1"]["stale"] is True


def test_servers_outside_the_topology_are_shown_after_it() -> None:
    table = build_table([rec("ha_probe_x", "pom9", "DORMANT"), rec("ha_probe_x", "pom1", "MASTER")], ["pom1"])
    assert table.header() == ["COMPONENT", "pom1", "pom9"]
    assert table.lines(5) == [["ha_probe_x", "MASTER", "DORMANT"]]


def lease(service: str, scope: str, holder: str | None, live: bool = True, epoch: int = 1) -> dict[str, object]:
    return {"service": service, "scope": scope, "holder_server": holder, "epoch": epoch, "live": live,
            "acquired_at": None, "expires_at": None}


def test_the_issue_pom2_example_shows_one_master_per_role_from_the_leases() -> None:
    """3 s after every process of pom2 was killed its rows still said MASTER (Default) and RUNNING, while the
    lease had moved to pom3: the table shows pom3 as the one master and pom2 as unreachable."""
    members = [
        rec("agent_manager", "pom1", "DORMANT"),
        rec("agent_manager", "pom2", "MASTER", ["Default"], age_s=3.2),
        rec("agent_manager", "pom3", "MASTER", ["Default"]),
        rec("campaign_manager", "pom2", "RUNNING", load=2, age_s=3.2),
        rec("campaign_manager", "pom3", "RUNNING", load=1),
    ]
    leases = [lease("agent_manager", "Default", "pom3", epoch=7)]
    table = build_table(members, ["pom1", "pom2", "pom3"], leases)
    lines = dict((line[0], line[1:]) for line in table.lines(stale_after_s=2))
    assert lines["Agent Manager"] == ["DORMANT", "UNREACHABLE (was DORMANT, 3 s)", "MASTER (Default)"]
    assert lines["Campaign Manager"] == ["-", "UNREACHABLE (was RUNNING (load 2), 3 s)", "RUNNING (load 1)"]
    assert table.masters(stale_after_s=2) == {"agent_manager/Default": ["pom3"]}
    # even before pom2 turns stale, the leases give the role one master only
    fresh = build_table([{**m, "age_s": 0.1} for m in members], ["pom1", "pom2", "pom3"], leases)
    assert fresh.masters(stale_after_s=2) == {"agent_manager/Default": ["pom3"]}
    assert dict((x[0], x[1:]) for x in fresh.lines(2))["Agent Manager"] == ["DORMANT", "DORMANT", "MASTER (Default)"]
    doc = table.as_json(stale_after_s=2)
    assert doc["components"]["agent_manager"]["pom2"]["stale"] is True
    assert doc["components"]["agent_manager"]["pom3"]["shown"] == "MASTER (Default)"


def test_an_expired_or_released_lease_makes_no_master() -> None:
    table = build_table([rec("rule_engine", "pom1", "MASTER", [""])], ["pom1"],
                        [lease("rule_engine", "", "pom1", live=False)])
    assert table.lines(5) == [["Rule Engine", "DORMANT"]]
    assert table.masters(5) == {}
