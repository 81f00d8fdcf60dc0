"""The pure parts of ``kafka verify``: topic names per organization, the table and the exit rule."""

from __future__ import annotations

from pom_ha.kafka.verify import FAIL, PASS, SKIP, Check, all_passed, event_topics, format_checks


def test_event_topics_per_organization() -> None:
    assert event_topics() == ["POM.Default.JOB", "POM.Default.JOBSTATISTICS", "POM.Default.AGENT",
                              "POM.Default.AGENTSTATISTICS", "POM.Default.ATTEMPT",
                              "POM.Default.ENRICHEDATTEMPTRESULT"]
    assert event_topics("1")[0] == "POM.1.JOB"


def test_only_a_failed_row_fails_the_run_and_the_table_names_it() -> None:
    rows = [Check("brokers registered in ZooKeeper", PASS, "ids 1,2,3"),
            Check("leader stop moves leadership", SKIP, "not run (--no-disruptive)")]
    assert all_passed(rows)
    rows.append(Check("every ISR complete", FAIL, "POM.Default.JOB[0] ISR 1,3 of 1,2,3"))
    assert not all_passed(rows)
    assert not all_passed([])
    table = format_checks(rows).splitlines()
    assert table[0].split() == ["CHECK", "RESULT", "DETAIL"]
    assert table[-1].startswith("every ISR complete") and " FAIL " in table[-1]
