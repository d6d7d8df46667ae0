"""Relevant priors through the whole runtime: real studies of one patient, sent out of order.

pydicom's ``dicomdirtests`` hold four studies of patient 98890234: a CT in 2001 and three
MR studies in 2003 (Brain, Brain-MRA, Carotids). dcmtk's ``storescu`` sends the MR studies
first and the CT last, as a site that back-loads an old study would; the worklist rows of
the MR studies must list their earlier studies with the rule that made each relevant or
the reason it is not, and the CT, arriving after them, must update their comparisons.
Priors are found in the de-identified zone (keyed pseudonym, shifted dates: intervals only)
and reach the identified worklist through the de-identification link.
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest

from adapters.warehouse import current_worklist
from schemas.settings import Settings
from tests.test_end_to_end import STORESCU, start_up, stop_up, storescu

pytestmark = pytest.mark.integration

PATIENT = "98890234"


def studies_of_patient() -> dict[str, list[Path]]:
    """Study description -> files, for the test patient (the CT has none: 'CT')."""
    root = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"
    found: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.startswith("DICOMDIR"):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue
        if ds.get("PatientID") == PATIENT:
            found[str(ds.get("StudyDescription") or ds.Modality)].append(path)
    return dict(found)


def wait_rows(settings: Settings, condition, what: str, timeout_s: float = 90) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    rows: list[dict] = []
    while time.monotonic() < deadline:
        rows = current_worklist(settings)
        if condition(rows):
            return rows
        time.sleep(0.5)
    raise AssertionError(f"{what} not seen in {timeout_s}s: {rows}")


@pytest.mark.skipif(not shutil.which(STORESCU), reason="dcmtk is installed by scripts/bootstrap.sh")
def test_later_studies_list_their_priors_and_a_prior_sent_late_updates_them(settings: Settings,
                                                                            tmp_path: Path) -> None:
    studies = studies_of_patient()
    assert set(studies) == {"CT", "Brain", "Brain-MRA", "Carotids"}, sorted(studies)
    proc = start_up(settings, tmp_path)
    try:
        mr = [path for name in ("Brain", "Brain-MRA", "Carotids") for path in studies[name]]
        assert storescu(settings, mr).returncode == 0
        first = wait_rows(settings, lambda rows: len(rows) == 3 and all(r["ai_status"] != "PENDING" for r in rows),
                          "three MR rows with their AI pre-read")
        assert not any(_modalities(line) == "CT" for r in first for line in r["priors"])
        assert storescu(settings, studies["CT"]).returncode == 0  # the old study, sent last

        def updated(rows: list[dict]) -> bool:
            mrs = [r for r in rows if r["modality"] == "MR"]
            return len(rows) == 4 and len(mrs) == 3 and all(any(_modalities(line) == "CT" for line in r["priors"])
                                                          for r in mrs)

        rows = wait_rows(settings, updated, "the MR rows updated with the CT sent after them")
    finally:
        stop_up(proc)
    ct = next(r for r in rows if r["modality"] == "CT")
    assert ct["priors"] == [] and ct["relevant_priors"] == 0  # the earliest study has no priors
    mrs = sorted((r for r in rows if r["modality"] == "MR"), key=lambda r: len(r["priors"]))
    for earlier, row in enumerate(mrs):
        ct_line = next(line for line in row["priors"] if _modalities(line) == "CT")
        # the CT is two years earlier, another modality and another body region: listed, with why not
        days = int(ct_line.split()[0])
        assert 700 < days < 900 and "not relevant" in ct_line, row["priors"]
        # the MR studies earlier that day are relevant, each with the rule that made it so
        mr_lines = [line for line in row["priors"] if _modalities(line) == "MR"]
        assert len(mr_lines) == earlier and all(": relevant (" in line for line in mr_lines), row["priors"]
        assert row["relevant_priors"] == earlier and (row["prior_summary"] or not earlier)
        # intervals only on the identified row: the de-identified (shifted) dates never come back
        assert not any("2001" in line or "2003" in line for line in row["priors"])


def _modalities(line: str) -> str:
    """'854 days before, CT: not relevant (...)' -> 'CT'."""
    return line.split(":", 1)[0].split(", ", 1)[-1]
