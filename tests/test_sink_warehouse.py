"""Every row the sink writes fits its table: one event of each kind, inserted through
the sink's own path into the real embedded warehouse, read back by the named queries."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta

import pytest

from radstream import procs
from schemas.events import Alert, DeadLetter, OrderReceived, PatientUpdated, Priority, StudyLink
from schemas.settings import Settings
from adapters.warehouse import apply_ddl, connect, query_rows
from streams.route import load_rules, route
from streams.sink import group_rows, insert_rows
from streams.sink_rows import rows_for
from test_stages import QUIET, T0, _assembled

pytestmark = pytest.mark.integration


@pytest.fixture
def warehouse(settings: Settings, tmp_path) -> Iterator[Settings]:
    proc = procs.spawn(procs.python_module("radstream.warehouse_server"), env={**os.environ, **settings.to_env()},
                       log_path=tmp_path / "warehouse.log")
    try:
        procs.wait_for_port(settings.bind_host, settings.warehouse.embedded_port, 30, proc)
        apply_ddl(settings)
        yield settings
    finally:
        procs.stop(proc, grace_s=5)


def test_each_event_kind_lands_in_its_table_and_the_named_queries_read_it(warehouse: Settings) -> None:
    study = _assembled(accession_number="ACC-1", study_description="CT HEAD")
    decision, row = route(study, load_rules(), T0 + QUIET)
    events = [
        (study, "radstream.study.assembled"),
        (decision, "radstream.routing.decision"),
        (row, "radstream.worklist.update"),
        (Alert(trace_id=study.trace_id, study_uid=study.study_uid, version=1, alert_type="critical_finding",
               severity=Priority.CRITICAL, message="ICH suspected", raised_at=T0), "radstream.alert"),
        (DeadLetter(stage="assemble", reason="undecodable", error="not avro", failed_at=T0, key="k"),
         "radstream.deadletter"),
        (DeadLetter(stage="deidentify", reason="burned_in_phi", error="US", failed_at=T0, key="k"),
         "radstream.deid.quarantine"),
        (StudyLink(trace_id=study.trace_id, study_uid=study.study_uid, version=1, deid_study_uid="2.25.77",
                   deid_trace_id="d", patient_pseudonym="P", source_site="SITE_A", linked_at=T0), "radstream.study.link"),
        # an order whose images never came, and one that matches the study
        (OrderReceived(trace_id="o1", accession_number="ACC-LONELY", message_type="ORM^O01", control_id="1",
                       source_site="SITE_A", received_at=T0, priority="S", reason_for_exam="chest pain"),
         "radstream.order.received"),
        (OrderReceived(trace_id="o2", accession_number="ACC-1", message_type="ORM^O01", control_id="2",
                       source_site="SITE_A", received_at=T0 + timedelta(seconds=1), priority="R"),
         "radstream.order.received"),
    ]
    rows = [r for offset, (event, topic) in enumerate(events) for r in rows_for(event, 0, offset, topic)]
    client = connect(warehouse)
    try:
        insert_rows(client, group_rows(rows))
        insert_rows(client, group_rows(rows))  # a redelivered batch changes nothing
        counts = {table: client.query(f"SELECT count() FROM {table} FINAL").result_rows[0][0]
                  for table in ("worklist", "stage_events", "alerts", "dead_letters", "study_links", "orders")}
    finally:
        client.close()
    assert counts == {"worklist": 1, "stage_events": 4, "alerts": 1, "dead_letters": 2, "study_links": 1, "orders": 2}
    unmatched = query_rows(warehouse, "unmatched_orders", limit=10)
    assert [(o["accession_number"], o["priority"], o["reason_for_exam"]) for o in unmatched] == [
        ("ACC-LONELY", "S", "chest pain")]
    without_order = query_rows(warehouse, "studies_without_order", limit=10)
    assert [s["study_uid"] for s in without_order] == [study.study_uid]


def test_an_adt_update_renames_that_patient_on_the_worklist_and_no_one_else(warehouse: Settings) -> None:
    """ADT^A08 corrects a patient's name: the identified worklist row of that patient at that
    site shows the new name; the same patient id at another site is another patient."""
    ours = _assembled(study="1.2.3", patient_id="P1", patient_name="DOE^JANE")
    theirs = _assembled(study="1.2.4", patient_id="P1", patient_name="ROE^RICHARD").replace(source_site="SITE_B")
    rows = [route(study, load_rules(), T0 + QUIET)[1] for study in (ours, theirs)]
    update = PatientUpdated(trace_id="adt1", message_type="ADT^A08", control_id="A1", source_site="SITE_A",
                            received_at=T0 + timedelta(minutes=5), patient_id="P1", patient_name="DOE^JANE^MARIE",
                            patient_sex="F")
    older = update.replace(control_id="A0", received_at=T0, patient_name="DOE^J")
    client = connect(warehouse)
    try:
        for event in (*rows, update, older):  # an older update arriving late does not win
            insert_rows(client, group_rows(rows_for(event, 0, 0, "t")))
    finally:
        client.close()
    names = {row["study_uid"]: row["patient_name"] for row in query_rows(warehouse, "current_worklist", limit=10)}
    assert names == {"1.2.3": "DOE^JANE^MARIE", "1.2.4": "ROE^RICHARD"}
