"""A crash of everything loses nothing that was acknowledged.

The runtime runs on its production defaults: blobs on the embedded SeaweedFS, the
embedded broker's log on it (``s3://``). Studies are made fresh from a real CT
(pydicom's CT_small, new UIDs) so that each test knows exactly what it sent.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from radstream import procs
from radstream.send import send_files
from schemas.events import trace_id_for
from schemas.settings import Settings
from adapters.warehouse import connect, current_worklist

pytestmark = pytest.mark.integration

STORESCU = "/usr/bin/storescu"
REPO = Path(__file__).resolve().parents[1]


def make_studies(folder: Path, studies: int, instances: int) -> dict[str, list[Path]]:
    """``studies`` new studies of ``instances`` CT slices each: {study_uid: files}."""
    template = dcmread(get_testdata_file("CT_small.dcm", download=False))
    out: dict[str, list[Path]] = {}
    for s in range(studies):
        study_uid, series_uid = generate_uid(), generate_uid()
        out[study_uid] = []
        for i in range(instances):
            ds = copy.deepcopy(template)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber, ds.AccessionNumber = i + 1, f"DUR{s:03d}"
            path = folder / f"s{s}-i{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            out[study_uid].append(path)
    return out


class Runtime:
    """``radstream up`` as a real process tree, started and killed like an operator would."""

    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        self.settings = settings
        self.env = {**os.environ, **settings.to_env()}
        self.tmp_path = tmp_path
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.log = self.tmp_path / f"up-{self.starts}.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "radstream", "up"], env=self.env,
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 150
        while "radstream is ready" not in self.log.read_text(errors="replace"):
            assert self.proc.poll() is None, f"radstream up exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "not ready after 150 s:\n" + self.log.read_text()[-4000:]
            time.sleep(0.25)

    def children(self) -> dict[str, int]:
        up = json.loads((Path(self.settings.data_dir) / "run" / "up.json").read_text())
        return {name: child["pid"] for name, child in up["children"].items()}

    def sigkill_everything(self) -> None:
        pids = list(self.children().values())
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in pids):
            assert time.monotonic() < deadline, "children outlived a SIGKILLed supervisor"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc, grace_s=60)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def runtime(durable_settings: Settings, tmp_path: Path) -> Iterator[Runtime]:
    settings = durable_settings.model_copy(update={
        "assembly": durable_settings.assembly.model_copy(update={"quiet_period_s": 6.0})})
    rt = Runtime(settings, tmp_path)
    try:
        yield rt
    finally:
        rt.stop()


def wait_for_studies(settings: Settings, expected: dict[str, int], timeout_s: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = [r for r in current_worklist(settings) if r["study_uid"] in expected]
        if {r["study_uid"]: r["instance_count"] for r in rows} == expected or time.monotonic() > deadline:
            return rows
        time.sleep(1)


def diagnosis(settings: Settings, studies: dict[str, list[Path]], counts: dict[str, int],
              acknowledged: dict[str, int]) -> str:
    """What the gateway and the worker logged about each study that came out wrong: a loss
    under a broker crash is rare, and the logs are gone with the test's temporary folder."""
    logs = Path(settings.data_dir) / "logs"
    kept = REPO / "test-artifacts" / f"durability-{int(time.time())}"  # CI keeps test-artifacts/
    shutil.copytree(settings.data_dir, kept, dirs_exist_ok=True, ignore_dangling_symlinks=True,
                    ignore=shutil.ignore_patterns("*.sock"))  # logs, and the broker log to restart
    lines = [f"worklist {counts} != acknowledged {acknowledged}; every log kept in {kept}"]
    for uid in (u for u in acknowledged if counts.get(u) != acknowledged[u]):
        sops = [dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in studies[uid]]
        needles = [uid, trace_id_for(uid), *sops]
        for name in ("dicom-gateway.log", "worker.log"):
            text = (logs / name).read_text(errors="replace") if (logs / name).exists() else ""
            lines += [f"{name}: {line[:400]}" for line in text.splitlines() if any(n in line for n in needles)]
        lines += [f"worker.log: {line[:300]}" for line in (logs / "worker.log").read_text(errors="replace").splitlines()
                  if "Recovery" in line or "rebalanc" in line.lower() or "end offset" in line]
    return "\n".join(lines[-200:])


def assert_each_exactly_once(settings: Settings, expected: dict[str, int]) -> None:
    client = connect(settings)
    try:
        for table, stage_filter in (("worklist", ""), ("stage_events", "AND stage = 'assembled'")):
            counts = dict(client.query(
                f"SELECT study_uid, count() FROM {table} FINAL WHERE study_uid IN {{uids:Array(String)}} "
                f"{stage_filter} GROUP BY study_uid", parameters={"uids": list(expected)}).result_rows)
            assert counts == {uid: 1 for uid in expected}, f"{table}: {counts}"
    finally:
        client.close()


def test_sigkill_of_everything_inside_the_quiet_period_loses_no_acknowledged_study(runtime: Runtime,
                                                                                  tmp_path: Path) -> None:
    studies = make_studies(tmp_path, studies=3, instances=2)
    runtime.start()
    sent = subprocess.run(
        [STORESCU, "-aet", "SITE_A", "-aec", runtime.settings.dicom.ae_title, runtime.settings.bind_host,
         str(runtime.settings.dicom.port), *(str(p) for files in studies.values() for p in files)],
        env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr
    runtime.sigkill_everything()  # every C-STORE was answered success; no study's quiet period has ended
    runtime.start()  # same data directory; nothing is sent again
    expected = {uid: len(files) for uid, files in studies.items()}
    rows = wait_for_studies(runtime.settings, expected)
    counts = {r["study_uid"]: r["instance_count"] for r in rows}
    assert counts == expected, diagnosis(runtime.settings, studies, counts, expected)
    assert all(r["version"] == 1 for r in rows)
    assert_each_exactly_once(runtime.settings, expected)


def test_sigkill_of_the_broker_while_studies_flow_ends_with_every_acknowledged_study_once(
        runtime: Runtime, tmp_path: Path) -> None:
    studies = make_studies(tmp_path, studies=6, instances=2)
    runtime.start()
    settings = runtime.settings
    acknowledged: dict[str, int] = {}

    def modality() -> None:  # one association per study, like a PACS pushing study by study
        for uid, files in studies.items():
            report = send_files(files, settings.bind_host, settings.dicom.port, "SITE_B", settings.dicom.ae_title,
                                progress=False)
            if not report.failed:
                acknowledged[uid] = len(files)
            time.sleep(0.5)

    sender = threading.Thread(target=modality)
    sender.start()
    time.sleep(1.0)
    broker_pid = runtime.children()["broker"]
    os.kill(broker_pid, signal.SIGKILL)
    sender.join(180)
    deadline = time.monotonic() + 60
    while runtime.children()["broker"] == broker_pid:  # the supervisor restarts it
        assert time.monotonic() < deadline, "the broker was not restarted:\n" + runtime.log.read_text()[-3000:]
        time.sleep(0.5)
    assert acknowledged, "no study was acknowledged at all"
    # studies refused while the broker was down are the sender's to retry: do so, as a PACS would
    for uid in set(studies) - set(acknowledged):
        report = send_files(studies[uid], settings.bind_host, settings.dicom.port, "SITE_B",
                            settings.dicom.ae_title, progress=False)
        assert not report.failed, f"the gateway still refuses after the broker came back: {report.failed}"
        acknowledged[uid] = len(studies[uid])
    rows = wait_for_studies(settings, acknowledged)
    counts = {r["study_uid"]: r["instance_count"] for r in rows}
    assert counts == acknowledged, diagnosis(settings, studies, counts, acknowledged)
    assert_each_exactly_once(settings, acknowledged)
