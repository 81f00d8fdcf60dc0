"""Campaign administration without a database: definition files, job states, fenced transactions, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pom_ha.campaign import admin
from pom_ha.campaign.fenced_tx import FenceLost, fenced_transaction
from pom_ha.cli import main
from pom_ha.domain.jobs import JobState
from pom_ha.ha.fencing import LeaseFence


def test_definition_files_in_toml_and_json(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('name = "c1"\ncontact_list = "l"\n[pacing]\ncalls_per_second = 2\n')
    assert admin.load_definition_file(str(toml))["pacing"] == {"calls_per_second": 2}
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"name": "c2"}))
    assert admin.load_definition_file(str(js)) == {"name": "c2"}


def test_unreadable_or_malformed_definition_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(admin.AdminError, match="cannot read"):
        admin.load_definition_file(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(admin.AdminError, match="not valid JSON"):
        admin.load_definition_file(str(bad))
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(admin.AdminError, match="is a table/object"):
        admin.load_definition_file(str(listed))


def test_job_rows_map_to_domain_statuses() -> None:
    assert admin.job_status("Running", None).state is JobState.RUNNING
    stopping = admin.job_status("Stopping", "Completed")
    assert stopping.ending is JobState.COMPLETED
    assert admin.job_status("Stopping", None).ending is JobState.STOPPED  # the conservative end


class _Tx:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def __aenter__(self) -> None:
        self.log.append("begin")

    async def __aexit__(self, exc_type: Any, *_: Any) -> None:
        self.log.append("rollback" if exc_type else "commit")


class _Conn:
    def __init__(self, held: bool) -> None:
        self.held = held
        self.log: list[str] = []

    def transaction(self) -> _Tx:
        return _Tx(self.log)

    async def fetchval(self, sql: str, *args: Any, **_options: Any) -> Any:
        self.log.append("fence:" + ("FOR SHARE" if "FOR SHARE" in sql else "?"))
        return 7 if self.held else None

    async def execute(self, sql: str, *args: Any) -> None:
        self.log.append("write")


async def test_a_fenced_transaction_writes_only_while_the_fence_holds() -> None:
    fence = LeaseFence("campaign_director", "", 7)
    ok = _Conn(held=True)
    async with fenced_transaction(ok, fence):
        await ok.execute("UPDATE x")
    assert ok.log == ["begin", "fence:FOR SHARE", "write", "commit"]
    lost = _Conn(held=False)
    with pytest.raises(FenceLost):
        async with fenced_transaction(lost, fence):
            await lost.execute("UPDATE x")
    assert lost.log == ["begin", "fence:FOR SHARE", "rollback"]


def test_cli_refuses_bad_input_before_touching_the_database(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["campaign", "create", str(tmp_path / "nope.toml")])
    assert out.exit_code == 2 and "error: cannot read" in out.output
    out = runner.invoke(main, ["campaign", "start", "c1", "--at", "2026-12-01T10:00:00"])
    assert out.exit_code == 2 and "give the time zone" in out.output
    out = runner.invoke(main, ["campaign", "start", "c1", "--at", "tomorrow"])
    assert out.exit_code == 2 and "expected an ISO 8601 time" in out.output
    out = runner.invoke(main, ["job", "pause", "not-a-number"])
    assert out.exit_code == 2 and "is not a valid integer" in out.output
