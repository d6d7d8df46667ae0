"""Record and replay, whole runtime: a recorded session replayed into a fresh runtime gives
the same worklist -- the same studies, priorities and readers -- and replaying it again adds
nothing.

Runtime A reads three head CTs (one with the demo hemorrhage painted in, which AI makes
CRITICAL) with a reader roster; ``radstream load record`` takes the gateways' topic
(instance.received) from it. Runtime B -- its own topics and warehouse database, the same
claim-check store -- gets the recording through ``radstream load replay``, twice.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapters.warehouse import connect, current_worklist
from radstream.cli import cli
from schemas.settings import Settings
from tests.test_assignment_runtime import NEURO_RULES, ROSTER, routine_head_ct
from tests.test_end_to_end import STORESCU, painted_head_ct, start_up, stop_up, storescu, wait_for_worklist

pytestmark = pytest.mark.integration


def worklist_of(settings: Settings) -> dict[str, tuple]:
    return {row["study_uid"]: (row["version"], row["instance_count"], row["priority"], row["subspecialty"],
                               row["assigned_reader"], tuple(row["ai_findings"]))
            for row in current_worklist(settings)}


def settled(settings: Settings, studies: int) -> dict[str, tuple]:
    """The worklist once every study has its AI result, a reader and a CRITICAL row where AI found one."""
    deadline = time.monotonic() + 120
    while True:
        rows = wait_for_worklist(settings, studies, ai=True)
        if all(row["assigned_reader"] for row in rows) and any(row["priority"] == "CRITICAL" for row in rows):
            return worklist_of(settings)
        assert time.monotonic() < deadline, rows
        time.sleep(0.5)


def row_counts(settings: Settings) -> dict[str, int]:
    client = connect(settings)
    try:
        return {table: client.query(f"SELECT count() FROM {table} FINAL").result_rows[0][0]
                for table in ("worklist", "results")} | {
            "assembled": client.query("SELECT count() FROM stage_events FINAL WHERE stage = 'assembled'").result_rows[0][0]}
    finally:
        client.close()


@pytest.mark.skipif(not shutil.which(STORESCU), reason="dcmtk is installed by scripts/bootstrap.sh")
def test_a_recorded_session_replayed_into_a_fresh_runtime_gives_the_same_worklist_and_twice_nothing_more(
        settings: Settings, tmp_path: Path) -> None:
    rules, roster = tmp_path / "rules.toml", tmp_path / "roster.toml"
    rules.write_text(NEURO_RULES)
    roster.write_text(ROSTER)
    env = {"RADSTREAM_ROUTING_RULES_FILE": str(rules), "RADSTREAM_ROUTING_ROSTER_FILE": str(roster),
           "RADSTREAM_HL7_SITE_STATES": "SITE_A=NV"}
    recording = tmp_path / "session.jsonl.gz"
    runner = CliRunner()

    proc = start_up(settings, tmp_path, **env)
    try:
        sent = storescu(settings, [routine_head_ct(tmp_path, 0), routine_head_ct(tmp_path, 1),
                                   painted_head_ct(tmp_path)])
        assert sent.returncode == 0, sent.stderr
        original = settled(settings, 3)
        recorded = runner.invoke(cli, ["load", "record", "instance.received", "-o", str(recording)],
                                 env=settings.to_env(), catch_exceptions=False)
        assert recorded.exit_code == 0, recorded.output
    finally:
        stop_up(proc)
    assert sorted(row[2] for row in original.values()) == ["CRITICAL", "ROUTINE", "ROUTINE"]
    assert {row[4] for row in original.values()} == {"dr-neuro-nv"}  # the one licensed in NV

    fresh = settings.model_copy(update={
        "kafka": settings.kafka.model_copy(update={"topic_prefix": settings.kafka.topic_prefix + "replay"}),
        "warehouse": settings.warehouse.model_copy(update={"database": "radstream_replay"})})
    proc = start_up(fresh, tmp_path, **env)
    try:
        replayed = runner.invoke(cli, ["load", "replay", str(recording), "--speed", "0"], env=fresh.to_env(),
                                 catch_exceptions=False)
        assert replayed.exit_code == 0, replayed.output
        assert settled(fresh, 3) == original
        expected = {"worklist": 3, "results": 3, "assembled": 3}  # one preliminary result each: the sink may trail
        deadline = time.monotonic() + 30
        while (counts := row_counts(fresh)) != expected and time.monotonic() < deadline:
            time.sleep(0.5)
        assert counts == expected

        again = runner.invoke(cli, ["load", "replay", str(recording), "--speed", "0"], env=fresh.to_env(),
                              catch_exceptions=False)
        assert again.exit_code == 0, again.output
        time.sleep(settings.assembly.quiet_period_s + 8)  # long enough for a duplicate to have made a new version
        assert worklist_of(fresh) == original
        assert row_counts(fresh) == counts
    finally:
        stop_up(proc)
