"""Benchmark: the whole durable ``radstream up`` against Orthanc, ingesting a head CT.

In one run it makes N real 526 kB head-CT slices (pydicom-data's ``693_UNCR.dcm``, a new
study per send, each slice a new SOP instance), starts ``radstream up`` on its durable
default (blobs and the broker's log on the embedded SeaweedFS) and Orthanc as the peer,
and sends the slices with dcmtk's ``storescu`` over 1 association and then over 4
concurrent ones, timing from the first send to the last ``storescu`` exit. Every
instance must be acknowledged by radstream and be on ``instance.received``; it prints
``ours / peer`` ratios (issue 20's goal: ≥ 0.5 with 4 associations) and, from
``/proc``, the CPU seconds each child of ``radstream up`` spent per 100 instances,
counted from the first send until the pipeline is idle again (assembly,
de-identification and the sink included), so every run shows where the time goes.

    python -m load.bench_ingest [--instances 300] [--py-spy DIR]

Where a sent instance's CPU goes now, in process order (4 associations, while sending,
2026-12-07 sixth pass; /proc per child, py-spy --gil for the gateway, Go pprof for weed;
the gateway and blob figures as of the eighth pass):

    child          CPU ms/inst  top costs
    dicom-gateway  ~9           pynetdicom's PDU and DIMSE handling ~6 (a bare pynetdicom SCP
                                that only writes files: 8-12 per slice); shuffle + LZ4 1.0;
                                walk + header 1.0; event encode + produce 0.5-0.9; SHA-256 0.4
    objectstore    12-18        weed's gRPC to its own filer 29 %, MD5 of each body (4 passes)
      (weed mini)               14 %, GC 13 %, HTTP I/O 14 %, volume write 7 %; per instance
                                1 blob PUT (~214 kB), 2.15 Tansu PUTs, 0.86 GETs, 0.35 LISTs
    broker (tansu)  2-3         native; its S3 requests are billed to weed above
    worker          2-3         assembly; de-identification runs once the study is assembled
                                (~11 ms of worker and ~12 of weed per instance after sending)
    all            ~30          storescu's own CPU comes on top, on the same 2 cores

On a faster day (ninth pass) every figure about halves, Orthanc's with them: gateway 4.5-5,
weed 6-8.5 for 3.3 requests (alone, the same requests cost it ~5), broker ~1, worker ~1.

Every pass since 2026-12-01, with its before/after figures, the profiles that led to it and
what was measured and not kept: ``load/bench_ingest.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file

from adapters.kafka import end_offsets
from load.bench_gateway import make_study, send
from load.orthanc_peer import Orthanc, start_orthanc
from radstream import procs
from schemas.settings import Settings, load_settings
from schemas.topics import INSTANCE_RECEIVED

HEAD_CT = "693_UNCR.dcm"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Runtime:
    """``radstream up`` as a subprocess on its own data dir and free ports."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180) -> None:
        env = {**os.environ, **self.settings.to_env()}
        self.proc = subprocess.Popen([sys.executable, "-m", "radstream", "up"], env=env,
                                     stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while "radstream is ready" not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"radstream up did not get ready:\n{self.log_path.read_text()[-4000:]}")
            time.sleep(0.25)

    def children(self) -> dict[str, int]:
        up = json.loads((self.settings.data_dir / "run" / "up.json").read_text())
        return {name: child["pid"] for name, child in up["children"].items() if child["pid"]}

    def stop(self) -> None:
        """SIGTERM: the supervisor stops its children; SIGKILL of the group if it hangs."""
        if self.proc is not None:
            procs.stop(self.proc, grace_s=60)


def _stat_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, utime + stime seconds, all threads) of every live process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return table


def family(pid: int, table: dict[int, tuple[int, float]] | None = None) -> set[int]:
    """``pid`` and every live descendant."""
    table = _stat_table() if table is None else table
    members = {pid}
    for _ in range(4):  # weed mini and the gateways fork no deeper
        members |= {p for p, (ppid, _) in table.items() if ppid in members}
    return members


def start_runtime(settings: Settings, log_path: Path) -> Runtime:
    """``radstream up`` started and ready, saying so and how long it took."""
    log("starting radstream up ...")
    runtime, started = Runtime(settings, log_path), time.monotonic()
    runtime.start()
    log(f"radstream is ready after {time.monotonic() - started:.0f} s")
    return runtime


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and every live descendant (all threads)."""
    table = _stat_table()
    return sum(table.get(p, (0, 0.0))[1] for p in family(pid, table))


def cpu_by_child(children: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in children.items()}


def wait_until_idle(children: dict[str, int], idle_cpu_s: float = 0.3, quiet_s: float = 3.0,
                    timeout_s: float = 120) -> None:
    """Until all children together burn under ``idle_cpu_s`` per second for ``quiet_s``:
    assembly's quiet period, de-identification and the sink have finished. An idle runtime
    itself spends ~0.1 CPU-s/s (clocks, heartbeats, the AI worker), hence 0.3."""
    deadline, quiet_since = time.monotonic() + timeout_s, time.monotonic()
    before = sum(cpu_by_child(children).values())
    while time.monotonic() < deadline:
        time.sleep(1)
        now = sum(cpu_by_child(children).values())
        if now - before > idle_cpu_s:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return
        before = now
    log("warning: the pipeline was still busy when the settle timeout ran out")


def events_received(settings: Settings) -> int:
    topic = INSTANCE_RECEIVED.name(settings)
    offsets = end_offsets(settings.kafka_bootstrap, [(topic, p) for p in range(settings.kafka.partitions)])
    return sum(offsets.values())


def start_py_spy(children: dict[str, int], out_dir: Path) -> list[subprocess.Popen]:
    """``py-spy record`` (GIL holders only, not pausing the target) on the DICOM gateway
    and the worker: the Python children that do the per-instance work."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    recorders = []
    for name, pid in children.items():
        if name not in ("dicom-gateway", "worker"):
            continue
        recorders.append(subprocess.Popen(
            [py_spy, "record", "--format", "raw", "--rate", "200", "--output", str(out_dir / f"{name}.txt"),
             "--pid", str(pid), "--gil", "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=open(out_dir / f"{name}.py-spy.log", "wb")))
    time.sleep(2)  # py-spy attaches
    return recorders


def stop_py_spy(recorders: list[subprocess.Popen]) -> None:
    for recorder in recorders:
        recorder.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    for recorder in recorders:
        try:
            recorder.wait(30)
        except subprocess.TimeoutExpired:
            recorder.kill()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=300, help="slices per send (default 300)")
    parser.add_argument("--py-spy", type=Path, metavar="DIR",
                        help="record each Python child of radstream up with py-spy during the 4-association "
                             "send, raw stacks into DIR (slows radstream: its rates are then not the headline)")
    args = parser.parse_args(argv)
    if args.instances < 4:
        parser.error("--instances must be at least 4")
    associations = (1, 4)

    with tempfile.TemporaryDirectory(prefix="radstream-ingest-") as tmp:
        root = Path(tmp)
        template = dcmread(get_testdata_file(HEAD_CT, download=False))
        log(f"generating {len(associations)} x {args.instances} head-CT slices ...")
        studies = {n: make_study(template, args.instances, root / f"outbox-{n}") for n in associations}
        warmup = make_study(template, 1, root / "warmup")  # first association, first produce: not timed
        size_kb = studies[1][0].stat().st_size / 1000

        settings = load_settings(data_dir=root / "data", **procs.isolated_listeners())
        print(f"instances: {args.instances} x {size_kb:.0f} kB head CT ({HEAD_CT}) per send; "
              f"radstream: blobs {settings.blobs.backend}, broker {settings.kafka.storage}",
              flush=True)

        orthanc_rates, radstream_rates = {}, {}
        log("starting Orthanc ...")
        orthanc: Orthanc = start_orthanc(root / "orthanc")
        try:
            dicom_port = json.loads((root / "orthanc" / "orthanc.json").read_text())["DicomPort"]
            send("127.0.0.1", dicom_port, "ORTHANC", warmup, 1)
            for n in associations:
                log(f"Orthanc: {n} association(s) ...")
                orthanc_rates[n] = args.instances / send("127.0.0.1", dicom_port, "ORTHANC", studies[n], n)
        finally:
            orthanc.stop()

        runtime = start_runtime(settings, root / "up.log")
        try:
            children = runtime.children()
            port, ae = settings.dicom.port, settings.dicom.ae_title
            send("127.0.0.1", port, ae, warmup, 1)
            wait_until_idle(children)
            ingest = dict.fromkeys(children, 0.0)  # CPU while storescu sends
            pipeline = dict.fromkeys(children, 0.0)  # CPU after the last C-STORE, until idle
            for n in associations:
                recorders = start_py_spy(children, args.py_spy) if args.py_spy and n == 4 else []
                log(f"radstream: {n} association(s) ...")
                try:
                    cpu_start = cpu_by_child(children)
                    radstream_rates[n] = args.instances / send("127.0.0.1", port, ae, studies[n], n)
                    cpu_sent = cpu_by_child(children)
                    log("waiting until assembly, de-identification and the sink are done ...")
                    wait_until_idle(children)
                    cpu_idle = cpu_by_child(children)
                finally:
                    stop_py_spy(recorders)
                for name in children:
                    ingest[name] += cpu_sent[name] - cpu_start[name]
                    pipeline[name] += cpu_idle[name] - cpu_sent[name]
            published = events_received(settings)
        finally:
            log("stopping radstream up ...")
            runtime.stop()

    sent = args.instances * len(associations)
    for n in associations:
        ratio = radstream_rates[n] / orthanc_rates[n]
        print(f"{n} association{'s' if n > 1 else ''}: radstream {radstream_rates[n]:.1f} inst/s, "
              f"orthanc {orthanc_rates[n]:.1f} inst/s, radstream / orthanc = {ratio:.2f}")
    print(f"events on {INSTANCE_RECEIVED.suffix}: {published}/{sent + len(warmup)} (every C-STORE acknowledged)")
    print(f"CPU seconds per 100 instances ({sent} sent), per child of radstream up:")
    print(f"  {'child':<14}{'sending':>8}{'after':>8}{'total':>8}")
    for name in sorted(children, key=lambda name: -(ingest[name] + pipeline[name])):
        print(f"  {name:<14}{ingest[name] / sent * 100:8.2f}{pipeline[name] / sent * 100:8.2f}"
              f"{(ingest[name] + pipeline[name]) / sent * 100:8.2f}")
    totals = (sum(ingest.values()), sum(pipeline.values()))
    print(f"  {'all':<14}{totals[0] / sent * 100:8.2f}{totals[1] / sent * 100:8.2f}{sum(totals) / sent * 100:8.2f}")
    if published != sent + len(warmup):
        print("error: acknowledged instances missing from instance.received", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
