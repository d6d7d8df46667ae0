"""The `radstream` command line, run as a real process against real peers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka import Producer
from pydicom.data import get_testdata_file
from pydicom.uid import UID

from radstream import procs
from radstream.cli import sort_worklist
from radstream.send import MAX_CONTEXTS, _Instance, batches
from schemas.codec import Codec
from schemas.events import InstanceReceived, trace_id_for, utcnow
from schemas.settings import Settings
from schemas.topics import ALL_TOPICS, INSTANCE_RECEIVED, key_of

REPO = Path(__file__).resolve().parents[1]


def radstream(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "radstream", *args], env=env or dict(os.environ), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return {**os.environ, **settings.to_env(), **extra}


def test_help_lists_every_command() -> None:
    done = radstream("--help")
    assert done.returncode == 0
    for command in ("up", "send", "worklist", "query", "topics"):
        assert command in done.stdout


def test_a_bad_setting_is_a_one_line_error_naming_the_key_with_exit_2() -> None:
    done = radstream("topics", "list", env={**os.environ, "RADSTREAM_DICOM_PORT": "abc"})
    assert done.returncode == 2
    assert "dicom.port" in done.stderr and "RADSTREAM_DICOM_PORT" in done.stderr and "'abc'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_config_file_is_an_error_with_exit_2(tmp_path: Path) -> None:
    done = radstream("--config", str(tmp_path / "nope.toml"), "topics", "list")
    assert done.returncode == 2 and "nope.toml does not exist" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------- topics


def _instance(study_uid: str) -> InstanceReceived:
    return InstanceReceived(
        trace_id=trace_id_for(study_uid), study_uid=study_uid, series_uid=study_uid + ".1",
        sop_instance_uid=study_uid + ".1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1", blob_uri="file:///blobs/x.dcm", blob_size=1234,
        blob_sha256="0" * 64, source_site="SITE_A", gateway="dicom", received_at=utcnow(), modality="CT",
    )


@pytest.fixture
def produced(broker: Settings) -> InstanceReceived:
    """One real InstanceReceived and one garbage message on instance.received."""
    event = _instance("1.2.826.0.1.3680043.2.1125.1")
    producer = Producer({"bootstrap.servers": broker.kafka_bootstrap})
    topic = INSTANCE_RECEIVED.name(broker)
    producer.produce(topic, Codec().encode(event), key=key_of(INSTANCE_RECEIVED, event))
    producer.produce(topic, b"not avro at all", key=key_of(INSTANCE_RECEIVED, event))
    assert producer.flush(10) == 0
    return event


def test_topics_list_shows_partitions_and_message_counts(broker: Settings, produced: InstanceReceived) -> None:
    done = radstream("topics", "list", env=_env(broker))
    assert done.returncode == 0, done.stderr
    rows = {}
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 3 and cells[0].startswith(broker.kafka.topic_prefix + "."):
            rows[cells[0]] = (int(cells[1]), int(cells[2]))
    assert rows[INSTANCE_RECEIVED.name(broker)] == (broker.kafka.partitions, 2)
    assert rows[broker.topic("audit")] == (broker.kafka.partitions, 0)
    assert len(rows) == len(ALL_TOPICS)


def test_topics_lag_shows_how_far_each_group_is_behind(broker: Settings, produced: InstanceReceived) -> None:
    """A group that read one of instance.received's two records is one behind; a group of
    another application shows with --all only; a group that never committed is not listed."""
    from confluent_kafka import Consumer, TopicPartition

    topic = INSTANCE_RECEIVED.name(broker)
    probe = Consumer({"bootstrap.servers": broker.kafka_bootstrap, "group.id": "probe"})
    partition = next(p for p in range(broker.kafka.partitions)  # both records have one key
                     if probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] > 0)
    probe.close()
    for group, offset in ((f"{broker.kafka.topic_prefix}-streams", 1), ("someone-else", 2)):
        consumer = Consumer({"bootstrap.servers": broker.kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
        consumer.commit(offsets=[TopicPartition(topic, partition, offset)], asynchronous=False)
        consumer.close()
    done = radstream("topics", "lag", "--json", env=_env(broker))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [{"group": f"{broker.kafka.topic_prefix}-streams", "topic": topic, "partitions": 1,
                                        "committed": 1, "end": 2, "lag": 1}]
    everyone = json.loads(radstream("topics", "lag", "--all", "--json", env=_env(broker)).stdout)
    assert {(r["group"], r["lag"]) for r in everyone} >= {("someone-else", 0), (f"{broker.kafka.topic_prefix}-streams", 1)}
    table = radstream("topics", "lag", env=_env(broker))
    assert table.returncode == 0 and f"{broker.kafka.topic_prefix}-streams" in table.stdout


def test_topics_tail_decodes_events_and_reports_undecodable_ones(broker: Settings, produced: InstanceReceived) -> None:
    done = radstream("topics", "tail", "instance.received", "--decode", "--from-beginning", "--max", "2",
                     "--timeout", "10", env=_env(broker))
    assert done.returncode == 0, done.stderr
    headers = [line for line in done.stdout.splitlines() if line.startswith(INSTANCE_RECEIVED.name(broker))]
    assert len(headers) == 2
    assert all(f"key={produced.study_uid}" in h and "partition=" in h and "offset=" in h for h in headers)
    assert "offset=0" in headers[0] and "offset=1" in headers[1]  # one key, one partition, in order
    body = done.stdout.split(headers[0], 1)[1].split(headers[1], 1)[0]
    event = json.loads(body)
    assert event["type"] == "InstanceReceived" and event["study_uid"] == produced.study_uid
    assert datetime.fromisoformat(event["received_at"]) == produced.received_at
    assert "undecodable: not an Avro event" in done.stdout.split(headers[1], 1)[1]


def test_topics_tail_of_an_unknown_topic_is_a_clean_error(broker: Settings) -> None:
    done = radstream("topics", "tail", "no.such.topic", "--timeout", "1", env=_env(broker))
    assert done.returncode == 1 and "no topic 'no.such.topic'" in done.stderr and "Traceback" not in done.stderr


def test_topics_tail_follows_new_messages_only_by_default(broker: Settings, produced: InstanceReceived) -> None:
    done = radstream("topics", "tail", "instance.received", "--timeout", "1", env=_env(broker))
    assert done.returncode == 0 and done.stdout == ""


# ---------------------------------------------------------------- send


@pytest.fixture
def storage_scp() -> Iterator[tuple[int, list[str]]]:
    """A pynetdicom Storage SCP that refuses MR images with 0xA700 (Out of resources)."""
    from pynetdicom import AE, StoragePresentationContexts, evt

    received: list[str] = []

    def on_store(event) -> int:
        if event.request.AffectedSOPClassUID == "1.2.840.10008.5.1.4.1.1.4":
            return 0xA700
        received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    ae = AE(ae_title="TESTSCP")
    ae.supported_contexts = StoragePresentationContexts
    port = procs.free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield port, received
    finally:
        server.shutdown()


def test_send_reports_sent_failed_with_status_and_skipped(storage_scp, tmp_path: Path) -> None:
    port, received = storage_scp
    folder = tmp_path / "study"
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm", download=False), folder / "ct.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm", download=False), folder / "mr.dcm")
    (folder / "notes.txt").write_text("not DICOM")

    done = radstream("send", str(folder), "--host", "127.0.0.1", "--port", str(port), "--aec", "TESTSCP",
                     "--no-progress")

    assert done.returncode == 1, done.stderr
    assert "sent 1, failed 1, skipped 1 non-DICOM files" in done.stdout
    failed = [line for line in done.stdout.splitlines() if line.startswith("failed")]
    assert len(failed) == 1 and "mr.dcm" in failed[0] and "0xA700" in failed[0]
    assert len(received) == 1


def test_send_to_nobody_fails_every_file_cleanly(tmp_path: Path) -> None:
    done = radstream("send", get_testdata_file("CT_small.dcm", download=False), "--port", str(procs.free_port()),
                     "--no-progress")
    assert done.returncode == 1 and "sent 0, failed 1" in done.stdout and "could not associate" in done.stdout
    assert "Traceback" not in done.stderr


def test_files_needing_more_than_128_contexts_go_over_several_associations() -> None:
    explicit, implicit = UID("1.2.840.10008.1.2.1"), UID("1.2.840.10008.1.2")
    instances = [_Instance(Path(f"{i}.dcm"), UID(f"1.2.3.{i}"), explicit) for i in range(MAX_CONTEXTS + 2)]
    instances += [_Instance(Path("again.dcm"), UID("1.2.3.0"), implicit)]  # uncompressed: shares 1.2.3.0's context
    groups = batches(instances)
    assert [len({i.context_key for i in g}) for g in groups] == [MAX_CONTEXTS, 2]
    assert sum(len(g) for g in groups) == len(instances)


# ---------------------------------------------------------------- worklist and query


def test_worklist_is_in_reading_order() -> None:
    rows = [
        {"study_uid": "a", "priority": "ROUTINE", "received_at": datetime(2024, 1, 1, 8, tzinfo=UTC)},
        {"study_uid": "b", "priority": "CRITICAL", "received_at": datetime(2024, 1, 1, 9, tzinfo=UTC)},
        {"study_uid": "c", "priority": "URGENT", "received_at": datetime(2024, 1, 1, 7, tzinfo=UTC)},
        {"study_uid": "d", "priority": "CRITICAL", "received_at": datetime(2024, 1, 1, 6, tzinfo=UTC)},
    ]
    assert [r["study_uid"] for r in sort_worklist(rows)] == ["d", "b", "c", "a"]


@pytest.fixture
def warehouse(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """The embedded warehouse endpoint with the radstream DDL applied."""
    if not (REPO / "radstream" / "warehouse_server.py").exists():
        pytest.skip("radstream.warehouse_server is not there yet")
    warehouse_mod = pytest.importorskip("adapters.warehouse")
    proc = procs.spawn(procs.python_module("radstream.warehouse_server"), env=_env(settings),
                       log_path=tmp_path / "warehouse.log")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(settings.warehouse_url + "/ping", timeout=1) as resp:
                    if resp.read().startswith(b"Ok"):
                        break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError((tmp_path / "warehouse.log").read_text()) from None
                time.sleep(0.1)
        warehouse_mod.apply_ddl(settings)
        yield settings
    finally:
        procs.stop(proc, 5)


def test_query_prints_json_and_csv_and_reports_sql_errors(warehouse: Settings) -> None:
    env = _env(warehouse)
    as_json = radstream("query", "SELECT 1 AS one, 'x' AS letter", "--format", "json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == [{"one": 1, "letter": "x"}]
    as_csv = radstream("query", "SELECT 1 AS one, 'x' AS letter", "--format", "csv", env=env)
    assert as_csv.stdout.splitlines() == ["one,letter", "1,x"]
    bad = radstream("query", "SELECT FROM WHERE", env=env)
    assert bad.returncode == 1 and "Syntax error" in bad.stderr and "Traceback" not in bad.stderr


def test_worklist_json_of_an_empty_warehouse_is_an_empty_list(warehouse: Settings) -> None:
    done = radstream("worklist", "--json", env=_env(warehouse))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_models_lists_cards_and_backends_and_a_second_run_reuses_the_tensorrt_plans(tmp_path: Path) -> None:
    """CI builds TensorRT(-RTX) plans of the shipped models on a CPU-only machine and caches
    them; the second start finds them by key (model hash + TensorRT version + target)."""
    env = {**os.environ, "RADSTREAM_DATA_DIR": str(tmp_path / "data")}
    command = [sys.executable, "-m", "radstream", "models", "--build-plans", "--json"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert {m["name"] for m in report["models"]} >= {"radstream-demo-ich-ct", "radstream-demo-ptx-cr"}
    assert all(m["not_for_clinical_use"] for m in report["models"])
    assert report["backends"]["onnxruntime-cpu"] == "available"
    assert {p["built"] for p in report["plans"]} == {True} and all(p["bytes"] > 100_000 for p in report["plans"])
    mtimes = {p["path"]: Path(p["path"]).stat().st_mtime_ns for p in report["plans"]}
    assert all(Path(path).parent == tmp_path / "data" / "trt-plans" for path in mtimes)
    second = json.loads(subprocess.run(command, env=env, capture_output=True, text=True, timeout=120,
                                       check=True).stdout)
    assert {p["built"] for p in second["plans"]} == {False}
    assert {p["path"]: Path(p["path"]).stat().st_mtime_ns for p in second["plans"]} == mtimes


def test_models_names_the_card_and_key_of_a_broken_card(tmp_path: Path) -> None:
    from engines.card import default_models_dir

    models = tmp_path / "models"
    shutil.copytree(default_models_dir() / "ich_ct_demo", models / "ich")
    card = models / "ich" / "card.yaml"
    card.write_text(card.read_text().replace("  threshold: 0.5", "  threshold: 1.5", 1))
    env = {**os.environ, "RADSTREAM_AI_MODELS_DIR": str(models)}
    result = subprocess.run([sys.executable, "-m", "radstream", "models"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and str(card) in result.stderr and "labels[0].threshold" in result.stderr
