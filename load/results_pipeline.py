"""The whole runtime for ``load.bench_results --mode pipeline``: ``radstream up`` on its own
data dir and ports, painted head CTs to send it, and broker timestamps read back.

Kept apart from :mod:`load.bench_results` (which imports this module, never the other way)
so the outbox mode does not carry it. Nothing here imports ``tests``: the routing rules and
the painted study are copies of what tests/test_end_to_end.py uses.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from radstream import procs
from schemas.settings import Settings
from schemas.topics import TopicSpec
from streams import delivery

HEAD_CT = "693_UNCR.dcm"

#: the routing rules of tests/test_end_to_end.py: a default plus one subspecialty and one priority rule
RULES = """
[defaults]
priority = "ROUTINE"
subspecialty = "general"

[[subspecialty]]
id = "chest-radiography"
when = { modality = ["CR", "DX"], body_part = ["CHEST"] }
subspecialty = "thoracic"

[[priority]]
id = "chest-cr-urgent"
description = "site policy: chest radiographs are read urgently"
when = { modality = ["CR"], body_part = ["CHEST"] }
priority = "URGENT"
"""


@dataclass(frozen=True)
class Study:
    """One study to send: its file and the identifiers the outputs must carry back."""

    path: Path
    study_uid: str
    accession_number: str
    patient_id: str


def painted_head_cts(count: int, out: Path, tag: str) -> list[Study]:
    """``count`` one-instance head-CT studies: pydicom-data's ``693_UNCR.dcm`` with the demo
    hemorrhage painted in (what the demo ICH model flags as critical), each with new UIDs, an
    accession number and a patient ID of its own."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    from engines.demo.synthetic import paint_finding

    source = get_testdata_file(HEAD_CT, download=False)
    if not source:
        raise RuntimeError(f"{HEAD_CT} is not installed (pydicom-data)")
    painted = paint_finding(dcmread(source), "hemorrhage", 101)
    out.mkdir(parents=True, exist_ok=True)
    studies = []
    for number in range(count):
        ds = copy.deepcopy(painted)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AccessionNumber, ds.PatientID = f"{tag}{number:07d}", f"MRN{tag}{number:06d}"
        path = out / f"{tag}-{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        studies.append(Study(path, str(ds.StudyInstanceUID), ds.AccessionNumber, ds.PatientID))
    return studies


class Runtime:
    """``radstream up`` as a subprocess (its own session) with these settings and extra ``RADSTREAM_*``."""

    def __init__(self, settings: Settings, log_path: Path, **env_extra: str) -> None:
        self.settings, self.log_path, self.env_extra = settings, log_path, env_extra
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180) -> float:
        """Start it and wait for "radstream is ready"; the seconds that took."""
        started = time.monotonic()
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("RADSTREAM_")},
               **self.settings.to_env(), **self.env_extra}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "radstream", "up"], env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = started + timeout_s
        while "radstream is ready" not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                code = self.proc.poll()
                self.stop()
                raise RuntimeError(f"radstream up did not get ready (exit {code}):\n"
                                   f"{self.log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(0.25)
        return time.monotonic() - started

    def stop(self) -> None:
        """SIGTERM: the supervisor stops its children; SIGKILL of the group if it hangs."""
        if self.proc is not None:
            procs.stop(self.proc, grace_s=30)
            self.proc = None


@dataclass(frozen=True)
class Stamped:
    """A decoded record with its broker timestamp (ms since the epoch) and its type
    (1: CreateTime, set by the producer; 2: LogAppendTime, set by the broker)."""

    timestamp_ms: int
    timestamp_type: int
    event: object


def read_stamped(settings: Settings, spec: TopicSpec, timeout_s: float = 30.0) -> list[Stamped]:
    """Every record of ``spec``'s topic from the beginning to its true end, decoded, with its timestamp."""
    return [Stamped(stamp, kind, event) for kind, stamp, event in delivery.read_stamped(settings, spec, timeout_s)]
