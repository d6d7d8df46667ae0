"""De-identification across processes and through the real pipeline.

Two worker processes that each de-identify half of one study, with the same key file,
must agree on the study/series UIDs and the pseudonym; a real Faust worker on a real
broker de-identifies a study end to end, the AI worker pre-reads it, and
``radstream phi-scan`` finds nothing in the de-identified zone, AI topics included (while
it does find the canaries in the identified one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread

from radstream import procs
from schemas.blobs import instance_key
from adapters.blobs import LocalBlobStore
from schemas.events import InstanceReceived, trace_id_for, utcnow
from schemas.settings import Settings
from schemas.events import InferenceStatus
from schemas.topics import DEID_QUARANTINE, INFERENCE_RESULT, STUDY_AI, STUDY_DEIDENTIFIED, STUDY_LINK
from schemas.deid.keys import load_keys
from tests.deid_fixtures import CANARIES, STUDY_UID, seeded_bytes
from tests.workers import start_worker
from tests.test_streams_worker import consume, produce

pytestmark = pytest.mark.integration

SERIES = (STUDY_UID + ".1", STUDY_UID + ".2")

_HALF = """
import json, sys
from pathlib import Path
from schemas.settings import load_settings
from deid.engine import deidentify_instance
from schemas.deid.keys import load_keys
from schemas.deid.policy import load_policy
settings = load_settings(data_dir=sys.argv[1])
keys, policy = load_keys(settings), load_policy().defaults
out = [deidentify_instance(Path(p).read_bytes(), policy, keys) for p in sys.argv[2:]]
print(json.dumps([[r.study_uid, r.series_uid, r.sop_instance_uid, r.patient_pseudonym] for r in out]))
"""


def study_files(tmp_path: Path, count: int = 6) -> list[Path]:
    """One head CT study (real CT_small pixels), two series, canary PHI in every instance."""
    paths = []
    for index in range(count):
        series = SERIES[index % 2]
        path = tmp_path / f"inst{index}.dcm"
        path.write_bytes(seeded_bytes("CT_small.dcm", series_uid=series, sop_uid=f"{series}.{index + 1}"))
        paths.append(path)
    return paths


def test_two_processes_with_halves_of_a_study_agree_on_uids_and_pseudonym(tmp_path: Path) -> None:
    paths = study_files(tmp_path)
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADSTREAM_")}
    # started together: both find no key file, and must still end up with one shared key
    halves = [subprocess.Popen([sys.executable, "-c", _HALF, str(data_dir), *map(str, half)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for half in (paths[:3], paths[3:])]
    results = []
    for proc in halves:
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        results.append(json.loads(stdout))
    first, second = results
    assert {r[0] for r in first} == {r[0] for r in second} and len({r[0] for r in first}) == 1
    assert {r[3] for r in first} == {r[3] for r in second} and len({r[3] for r in first + second}) == 1
    # each original series maps to one de-identified series, whichever process saw it
    series_of: dict[str, set[str]] = {}
    for index, (_, series, _, _) in enumerate(first + second):  # in path order: halves were contiguous
        series_of.setdefault(SERIES[index % 2], set()).add(series)
    assert all(len(uids) == 1 for uids in series_of.values())
    assert len(set().union(*series_of.values())) == 2
    assert len({r[2] for r in first + second}) == 6
    # a restart (a third process, later) maps the same way: nothing lives in memory only
    again = subprocess.run([sys.executable, "-c", _HALF, str(data_dir), str(paths[0])], env=env,
                           capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(again.stdout)[0] == first[0]
    key_file = data_dir / "secrets" / "deid.key"
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(key_file.read_bytes()) == 32


def test_worker_deidentifies_a_study_end_to_end_and_phi_scan_finds_nothing(broker: Settings, tmp_path: Path) -> None:
    store = LocalBlobStore(broker.blob_root)
    paths = study_files(tmp_path, 3)
    us = dcmread(paths[0])
    us.Modality, us.SOPInstanceUID = "US", SERIES[0] + ".9"
    us.file_meta.MediaStorageSOPInstanceUID = us.SOPInstanceUID
    us.save_as(tmp_path / "us.dcm")
    paths.append(tmp_path / "us.dcm")
    events = []
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        data = path.read_bytes()
        blob = store.put(instance_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID), data)
        events.append(InstanceReceived(
            trace_id=trace_id_for(STUDY_UID), study_uid=STUDY_UID, series_uid=ds.SeriesInstanceUID,
            sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, transfer_syntax_uid="1.2.840.10008.1.2.1",
            blob_uri=blob.uri, blob_size=blob.size, blob_sha256=blob.sha256, source_site="SITE_A", gateway="test",
            received_at=utcnow(), modality=ds.Modality, expected_study_instances=len(paths),
            patient_id=str(ds.PatientID), patient_name=str(ds.PatientName), study_description=ds.StudyDescription))
    proc = start_worker(broker, tmp_path / "worker.log")
    ai = start_worker(broker, tmp_path / "inference.log", role="inference")
    try:
        produce(broker, events)
        deidentified = consume(broker, STUDY_DEIDENTIFIED, 1)
        links = consume(broker, STUDY_LINK, 1)
        held = consume(broker, DEID_QUARANTINE, 1)
        results = consume(broker, INFERENCE_RESULT, 1)
        relinked = consume(broker, STUDY_AI, 1)
    finally:
        procs.stop(ai, grace_s=5)
        procs.stop(proc, grace_s=5)
    assert len(deidentified) == 1, (tmp_path / "worker.log").read_text()[-3000:]
    study, link = deidentified[0], links[0]
    keys = load_keys(broker)  # the key file the worker created on first use
    assert study.study_uid == keys.uid(STUDY_UID) == link.deid_study_uid and link.study_uid == STUDY_UID
    assert study.instance_count == 3 and len(study.series) == 2
    assert held[0].reason == "burned_in_phi" and "modality US" in held[0].error and held[0].key == STUDY_UID
    # the AI worker read the de-identified study; only the identified zone knows whose it is
    assert len(results) == 1, (tmp_path / "inference.log").read_text()[-3000:]
    result = results[0]
    assert result.study_uid == study.study_uid and result.trace_id == study.trace_id
    assert result.status is InferenceStatus.OK and result.models[0].images == 3
    assert relinked[0].study_uid == STUDY_UID and relinked[0].trace_id == link.trace_id
    assert relinked[0].models == result.models

    canaries = tmp_path / "canaries.txt"
    canaries.write_text("\n".join([*CANARIES, link.trace_id]) + "\n")
    env = {**os.environ, **broker.to_env(), "RADSTREAM_KAFKA_BOOTSTRAP": broker.kafka_bootstrap}
    radstream = [sys.executable, "-m", "radstream", "phi-scan", "--canaries", str(canaries)]
    clean = subprocess.run(radstream, env=env, capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    # every event of the de-identified zone was read: the study, its AI result, its prior
    # comparison(s) and their copies keyed by patient (no hint: no order; no retry: the queue
    # was never full)
    import re

    events = int(re.search(r"(\d+) events", clean.stdout).group(1))
    per_topic = dict(re.findall(r"\.([a-z.-]+) (\d+)/\d+", clean.stdout))
    assert events == sum(map(int, per_topic.values())) >= 5, clean.stdout
    assert per_topic["study.deidentified"] == "1" and per_topic["inference.result"] == "1", clean.stdout
    assert "3 blobs" in clean.stdout and "0 findings" in clean.stdout
    # the scanner is not blind: the identified topic it is pointed at is full of canaries
    dirty = subprocess.run([*radstream, "--topic", "study.assembled"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert dirty.returncode == 1 and "patient_name  canary 'CANARYPN'" in dirty.stdout, dirty.stdout + dirty.stderr
