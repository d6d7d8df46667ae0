"""The canary audit of issue #15 as a test, and dciodvfy on every de-identified output.

Real files (pydicom's CT/MR, pydicom-data's chest CR and head CT) are seeded with a canary
in every VR Annex E lists -- nested three items deep, private, free text with phone,
date and record numbers -- and sent from a site whose calling AE title and site-map
name are canaries too. They go through the real stage (:func:`streams.deidentify.run`,
real blob store); every de-identified event and every ``deid/`` blob is then scanned.
dciodvfy (dicom3tools) must find no error in an output that its input did not have.
"""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from adapters.blobs import LocalBlobStore
from deid.engine import deidentify_instance
from radstream.phi_scan import scan_blob, scan_event
from schemas.blobs import instance_key
from schemas.deid.keys import DeidKeys
from schemas.deid.policy import parse_policy
from schemas.events import CompletionReason, InstanceRef, StudyAssembled, trace_id_for, utcnow
from streams.deidentify import run
from tests.deid_fixtures import (
    AUDIT_CANARIES,
    CANARY_AE,
    CANARY_SITE,
    NUMBER_CANARIES,
    REAL_FILES,
    SERIES_UID,
    STUDY_UID,
    audit_bytes,
    real_path,
)

KEYS = DeidKeys(bytes(range(32)))
POLICIES = {
    "all-options": {"options": ["retain_longitudinal_modified_dates", "retain_patient_characteristics",
                                "clean_descriptors"]},
    "basic-profile": {"options": []},
}
_FREE_TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT"})
DCIODVFY = "/usr/bin/dciodvfy"


def text_values(ds: Dataset) -> list[tuple[str, str]]:
    """(keyword, value) of every free-text element, at any sequence depth."""
    found = []
    for element in ds.iterall():
        if element.VR in _FREE_TEXT_VRS and element.value not in (None, ""):
            found.append((element.keyword or str(element.tag), str(element.value)))
    return found


def audited_study(store: LocalBlobStore, source_site: str) -> tuple[StudyAssembled, list[str]]:
    refs, sops = [], []
    for index, name in enumerate(REAL_FILES):
        sop = f"{SERIES_UID}.{index + 1}"
        blob = store.put(instance_key(STUDY_UID, SERIES_UID, sop), audit_bytes(name, sop_uid=sop))
        refs.append(InstanceRef(sop_instance_uid=sop, series_uid=SERIES_UID, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                transfer_syntax_uid="1.2.840.10008.1.2.1", blob_uri=blob.uri, blob_size=blob.size))
        sops.append(sop)
    now = utcnow()
    study = StudyAssembled(
        trace_id=trace_id_for(STUDY_UID), study_uid=STUDY_UID, version=1, source_site=source_site,
        instance_count=len(refs), modalities=["CT", "MR", "CR"], body_parts=[], series=[], instances=refs,
        first_received_at=now, last_received_at=now, assembled_at=now,
        completion_reason=CompletionReason.QUIET_PERIOD_ELAPSED,
        patient_id="CANARYID-0001", patient_name="CANARYPN^ALICE", institution_name="CANARYHOSP General")
    return study, sops


def test_every_audit_canary_is_really_in_the_inputs() -> None:
    """The audit is not blind: each canary shows in some seeded input, numbers in its free text."""
    seen: set[str] = set()
    numbers = set()
    for name in REAL_FILES:
        data = audit_bytes(name)
        seen |= {f.problem.split("'")[1] for f in scan_blob(data, name, AUDIT_CANARIES, parse_policy({}).defaults)
                 if f.problem.startswith("canary")}
        numbers |= {n for _, value in text_values(dcmread(io.BytesIO(data))) for n in NUMBER_CANARIES if n in value}
    site_only = {CANARY_AE, "CANARYSITE"}
    assert seen == set(AUDIT_CANARIES) - site_only
    assert numbers == set(NUMBER_CANARIES)


@pytest.mark.parametrize("source_site", [CANARY_AE, CANARY_SITE], ids=["calling-ae-title", "site-map-name"])
@pytest.mark.parametrize("options", POLICIES.values(), ids=POLICIES.keys())
def test_canary_audit_nothing_crosses_into_the_deidentified_zone(tmp_path: Path, source_site, options) -> None:
    store = LocalBlobStore(tmp_path / "blobs", fsync=False)
    study, sops = audited_study(store, source_site)
    policy = parse_policy({"defaults": options})
    outcome = run(study, store, policy, KEYS, utcnow())
    event = outcome.deidentified
    assert event is not None and event.instance_count == len(REAL_FILES) and not outcome.quarantined
    identifying = [*AUDIT_CANARIES, study.trace_id, STUDY_UID, *sops]
    assert scan_event(event, "study.deidentified", identifying) == []
    blobs = [store.uri_of(key) for key in store.keys("deid/")]
    assert sorted(blobs) == sorted(ref.blob_uri for ref in event.instances)
    for uri in blobs:
        data = store.get(uri)
        assert scan_blob(data, uri, identifying, policy.defaults) == [], uri
        leaked = [(keyword, value) for keyword, value in text_values(dcmread(io.BytesIO(data)))
                  if any(number in value for number in NUMBER_CANARIES)]
        assert leaked == [], uri


def dciodvfy_errors(path: Path) -> set[str]:
    """dciodvfy's error lines with values blanked (de-identification changes values, not
    problems) but the element and module named: blanking every <...> once hid a new
    "Missing attribute Type 1" behind an error of the same kind the input already had."""
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return {re.sub(r"(?<!Element=)(?<!Module=)<[^>]*>", "<>", re.sub(r"\s+", " ", line))
            for line in lines if line.startswith("Error")}


@pytest.mark.skipif(not Path(DCIODVFY).exists(), reason="dciodvfy missing: run scripts/bootstrap.sh (dicom3tools)")
@pytest.mark.parametrize("seeded", [False, True], ids=["as-received", "audit-seeded"])
@pytest.mark.parametrize("options", POLICIES.values(), ids=POLICIES.keys())
@pytest.mark.parametrize("name", REAL_FILES)
def test_dciodvfy_finds_no_error_in_a_deidentified_output_that_its_input_did_not_have(
        tmp_path: Path, name, options, seeded) -> None:
    assert_no_new_dciodvfy_errors(tmp_path, audit_bytes(name) if seeded else real_path(name).read_bytes(), options)


def assert_no_new_dciodvfy_errors(tmp_path: Path, source: bytes, options: dict) -> None:
    """De-identify ``source`` with these policy options: dciodvfy finds nothing new in the output."""
    before, after = tmp_path / "in.dcm", tmp_path / "out.dcm"
    before.write_bytes(source)
    after.write_bytes(deidentify_instance(source, parse_policy({"defaults": options}).defaults, KEYS).data)
    assert dciodvfy_errors(after) - dciodvfy_errors(before) == set()
