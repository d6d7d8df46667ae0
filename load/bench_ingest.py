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

Measured 2026-12-01 on the 2-core dev machine, N=300, radstream settled between the
two sends (so the 4-association figure is not competing with the 1-association study's
de-identification): radstream 73.0 inst/s (1 association) and 96.6 (4) vs Orthanc
198.2 and 484.0, ratios 0.37 and 0.20 (six runs that day: radstream 62-82 and 92-109,
Orthanc 198-315 and 444-534). CPU per instance, by child of ``radstream up`` (/proc
utime+stime, both sends plus the settle; "sending" = while storescu runs):

    child        ms/inst  share  sending  top costs (profilers below)
    objectstore   16.8     52%     8.8    crypto/md5 36% of its CPU (4 MD5 passes over every
      (weed mini)                         PUT body: S3 ETag tee x2, UploadReaderInChunks
                                          md5.Sum, volume needle ParseUpload); syscalls 15%
                                          (S3 -> filer -> volume hops over loopback HTTP/gRPC);
                                          PutObjectHandler 24% + volume PostHandler 20% cum;
                                          filer gRPC (leveldb, AssignVolume) 12%; GETs ~3%;
                                          Tansu's log objects ~3.5-5 ms/inst (1.31 vs 1.68-1.86
                                          s/100 with RADSTREAM_KAFKA_STORAGE=memory://tansu/)
    dicom-gateway  7.2     22%     7.1    pynetdicom PDU/DIMSE reactor 24%; botocore S3 put
                                          21% (SigV4, checksums, urllib3); association setup
                                          12.5% (pynetdicom deep-copies every presentation
                                          context: ~50 ms per association); publish 12% (Avro
                                          encode, produce); dcmread header + file
                                          meta + header_text 13%; completeness walk 4.7%;
                                          pixel-data check 3.1%; metadata 2.8%; logging 2%;
                                          sha256 ~1% (GIL-held part only)
    worker         6.6     20%     0.5    de-identification 69% of it: Annex E walk and
                                          deidentify_dataset 37%, blob GET 12%, blob PUT 10%,
                                          encode 5.5%, header dcmread 4.3%; Faust/asyncio 9%;
                                          assembly 1.8%; sink 1.5%; routing < 0.5%
    broker (tansu) 1.4      4%     1.2    (native; its S3 writes are billed to weed above)
    warehouse      0.3      1%     0.0
    all           32.3            17.5    storescu's own CPU comes on top, on the same 2 cores

Re-measured 2026-12-01 10:17-10:33 on the same machine, busier than in the morning
(Orthanc's own rates 133-219 and 283-439), N=300, a clean tree of the committed code.
Before/after: blobs over loopback sent without SigV4 payload hashing (UNSIGNED-PAYLOAD)
and without botocore's flexible CRC checksums (adapters/s3.py):

    run           1 assoc (ratio)    4 assoc (ratio)    CPU s/100 inst: weed  gateway  worker  all
    before x3     52-58 (0.27-0.42)  71-85 (0.16-0.28)            2.10-2.54  0.85-0.95  0.77-0.98  4.33-5.04
    after  x3     48-57 (0.25-0.32)  55-82 (0.14-0.20)            2.07-2.66  0.89-1.02  0.76-0.89  4.16-5.16

The change saves ~0.5 ms of gateway CPU per instance (0.89-0.90 vs 0.94-0.95 s/100 in the
two quiet pairs) and a little in the worker's de-identification GET/PUT; the rates move
within the machine's noise. Tried and not kept (no gain beyond noise, one run each):
``GOGC=400 GOMEMLIMIT=1GiB`` for weed (objectstore 2.45 s/100, 0.23/0.22);
``-filer.saveToFilerLimit=1048576`` so a slice lives in the filer's store instead of a
volume (2.29 s/100, 0.22/0.19, and it moves 0.5 MB values into leveldb's compactions).
The profile table above still holds in shape: weed ~2.1-2.5 s/100 (about half), the
gateway ~0.9, the worker ~0.8, the broker ~0.2, the AI worker ~0.17 (new since the table).
0.5x still needs the object store's per-PUT cost cut by several times (one PUT per
instance through a leaner store or fewer hops), not client settings.

Re-measured 2026-12-07 on the same machine, slower that day for both sides (Orthanc
106-108 on 1 association, 164-203 on 4). Four changes: producers not idempotent (Tansu
rewrote its cluster metadata object per idempotent produce), blobs through obstore
instead of boto3, blobs LZ4-framed (the slice 1.92x), pynetdicom's per-association deep
copy of the supported contexts gone. A/B of the 4-association send (200 slices), the
committed code of the morning against the new, alternating, 4 rounds each:

    tree     inst/s (4 rounds)          CPU ms/inst while sending: weed  gateway  broker  worker  all
    before   35.7 29.8 37.0 33.9 (34.1)                     21.2-26.4 16.8-20.0 5.3-7.4 3.5-4.7 47-59
    after    41.8 60.3 53.0 45.6 (50.2)                     12.1-18.7 11.8-15.8 3.0-4.8 2.1-3.5 29-43

Both trees ran at ~1.76 busy cores, so the rate follows the CPU per instance. SeaweedFS's
own counters per instance while sending (100 slices): Tansu PUTs 4.67 -> 2.90, volume
POSTs 5.67 -> 3.90, filer leveldb finds 20.5 -> 14.6. Then ``bench_ingest`` twice:
radstream 35.7 / 34.6 inst/s on 1 association (0.33 / 0.33) and 47.4 / 40.8 on 4
(0.29 / 0.20). What is left per instance, by child, while sending (CPU ms): the object
store 19-21 (the 274 kB blob ~4.5 ms; the rest is Tansu's ~6 requests per instance:
the gateway's produce is a conditional GET of its metadata, a watermark PUT and a batch
PUT, then the worker's fetches and commits); the gateway 14 (py-spy --gil: pydicom's
header read and attribute access ~25 %, pynetdicom's PDU and DIMSE work ~30 %, publish
9 %); the broker 5-6; the worker 4. Tried and not kept: Faust ``producer_linger`` 10 ms
(Tansu PUTs 3.17 -> 2.96 per instance, within noise in CPU). 0.5x still needs the
broker's object-store requests per event cut, which is inside Tansu, or a header read
that skips pydicom in the gateway.

Third pass, 2026-12-07 (later), five changes, each measured on its own:
``Codec.encode`` validates with fastavro's boolean check first (the raising form built a
ValidationError for every union branch not taken: 373 -> 130 us per InstanceReceived);
the file meta is encoded directly (pynetdicom's data set and pydicom's writer: 550 -> 9
us); the header helpers read UIDs, codes, dates and IS/US numbers from their raw bytes
(dcmread plus every header read of one slice: 1,132 -> 680 us); ``kafka.partitions``
defaults to 1 (the idle runtime: Tansu's conditional GETs 34 -> 8.5/s, the broker 0.11 ->
0.05 of a core, the object store 0.06 -> 0.03); the blob is stored in the handler's
thread while the produce is in flight, not in a pool thread. The whole runtime did not
show it: seven alternating pairs of the 4-association send (300 slices), the morning's
last commit against these, 65.2 -> 65.7 inst/s and 28.0 -> 27.4 CPU ms per instance on
average, the pairs themselves ranging 50.8-75.4 as the machine's speed drifted. Then
``bench_ingest`` twice:

    run   1 association (ratio)       4 associations (ratio)     CPU s/100 inst: weed  gateway  worker  broker
    1     64.5 vs 129.5 (0.50)        71.2 vs 220.6 (0.32)                       2.09  0.79     0.88    0.37
    2     57.2 vs 129.0 (0.44)        67.6 vs 292.5 (0.23)                       2.23  0.89     1.07    0.41

While sending, the object store is now half of radstream's CPU (12-13 of ~24 ms per
instance). SeaweedFS's counters per instance while sending 300 slices on 4 associations:
one blob PUT, and for Tansu 2.66 PUTs (the gateway's batch and watermark, the assembly
changelogs), 1.04 GETs and 0.55 LISTs (the worker's fetches) and 0.14 conditional GETs;
behind them 3.66 volume POSTs and 12.5 filer look-ups. At ~2 ms of weed CPU per request
that is most of it. The gateway's events are never batched: its handlers take turns on
the GIL, so publishes arrive ~10 ms apart, and a 5 ms ``linger.ms`` changed Tansu's PUTs
per instance from 2.99 to 2.98. What would move the ratio is fewer object-store requests
per event: group commit of concurrent associations' events into one produce (one batch
PUT, watermark PUT and fetch GET for several instances), at the price of a linger on each
C-STORE; or a broker whose log is not an object per produce.

Fourth pass, 2026-12-07 (09:45-10:30): that group commit (``kafka.group_commit_ms``, 15 ms).
A publish made while another caller waits for its ack goes through a second producer that
lingers; one made alone is sent at once, so one association pays nothing (97 of 100 of
its publishes went alone, the rest were the warm-up's tail). Alternating A/B of the
4-association send (200 slices), off against 15 ms, seven and eight runs over 40 minutes:
59.6-79.2 inst/s (mean ~71) against 49.0-74.1 (mean ~62.5); while sending the object
store 8.8-12.2 CPU ms per instance (mean 9.9) against 10.8-17.1 (mean 13.6), the broker
1.4-2.3 against 2.2-3.9. 8 and 30 ms measured within that noise, two runs each. Then
``bench_ingest`` twice: 4 associations 77.4 vs 230.5 (0.34) and 75.8 vs 209.9 (0.36),
1 association 49.2 vs 108.6 (0.45) in the second run, the machine slower than earlier
that day for both sides.

Fifth pass, 2026-12-07 (12:00-12:35). The gateway's CPU is mostly pynetdicom's: a bare
pynetdicom SCP that only writes files costs 8-12 CPU ms per slice on its own. Its
``AssociationSocket.recv`` read every PDU 4,096 bytes per call (~130 calls a slice); the
gateway now reads with ``recv_into`` for all the socket holds (``dicom_reactor``). A/B
of the 4-association send, 3 rounds: 61.5 -> 72.1 inst/s (means; runs 59.9-64.4 against
61.8-87.7), gateway 11.3 -> 10.1 CPU ms per instance. ``bench_ingest`` once after: 48.3
vs 108.7 (0.44) on 1 association, 65.3 vs 194.4 (0.34) on 4; CPU s/100 while sending:
weed 1.33, gateway 1.01, broker 0.29, worker 0.19. Measured and not kept: GOMAXPROCS=1
for weed with one Tokio worker for Tansu (weed 10.4 vs 11.0 ms per instance, but 61.0
inst/s: one Go thread serialises the store); librdkafka's one request in flight instead
of the lingering group producer (63.7 vs 66.2 inst/s, weed 13.2 vs 10.8 ms: fewer events
per produce). Still to take: pynetdicom builds and encodes each C-STORE-RSP as a pydicom
data set (~0.4-0.7 ms a slice; taken in the sixth pass) and turns each request's command
set into a primitive through validating setters (~0.3 ms).

Sixth pass, 2026-12-07 (14:00-14:25): where SeaweedFS's CPU goes, and what radstream can
change of it. Go pprof of ``weed mini -debug`` for 9 s of a 600-slice, 4-association send
(55.4 inst/s; weed 14.6, gateway 11.7, broker 3.2, worker 2.4 CPU ms per instance), by
what each sample was doing: the filer's gRPC server 16.4 % (ObjectTransaction, the entry
of each PUT, 7.9; ListEntries, behind Tansu's LISTs, 6.7) and gRPC transport 12.6, so
~29 % is the S3 server talking to its own filer; MD5 of bodies 14.0 (each PUT's body is
hashed four times: twice while it is read, once per chunk, once more by the volume
server); GC and allocation 13.2; other HTTP reading and writing 14.0; the volume server's
write 7.3; the S3 PUT and LIST handlers 11.8, and their middleware (auth, routing, CORS)
4.6. None of that is tunable from outside: ``GOGC=400`` and ``-filer.saveToFilerLimit=65536``
(small objects inside the filer's store) were measured within noise (2 rounds each). What
radstream decides is the number of requests and bytes: per instance while sending, 1 blob
PUT (~268 kB after LZ4), 2.15 Tansu PUTs (batch object and watermark per produce), 0.86
GETs and 0.35 LISTs (the stream workers' fetches; Tansu answers a fetch that found records
only at the end of its wait, so fetches, not instances, set that rate) and ~15 filer-store
operations. Idle, the runtime's consumers cost 9 conditional GETs and 2 PUTs a second
(0.04 cores of weed, 0.05 of Tansu). Of the produce requests while sending 300 slices,
184 were the gateway's ``instance.received`` batches (1.6 events each) and 122 the
worker's two assembly changelogs; Faust's ``PRODUCER_LINGER=0.05`` halves the latter (61),
worth ~0.4 PUTs per instance, not measured as a rate. Measured and not kept: two gateway
processes sharing the port (``SO_REUSEPORT``, the issue's first direction), 3 alternating
rounds: 47.8 against 54.6 inst/s (means). The two gateways' CPU together was 12.2 ms per
instance against one's 12.0, so the GIL was not costing CPU; weed rose from 13.7 to 18.1
and Tansu from 2.8 to 3.8, because two publishers split the group commit into more
produce requests. Several gateway processes would need one publisher between them.
Kept: each plain C-STORE-RSP is encoded directly (``dicom_wire.encode_c_store_rsp``, sent
by ``dicom_reactor``) instead of as a pydicom data set encoded twice, 773 us a response
timed alone; A/B of the 4-association send, 3 rounds: 61.0 -> 68.3 inst/s (means; runs
57.2-67.3 against 61.2-79.7), gateway 11.3 -> 9.9 CPU ms per instance. And pynetdicom's
standard logging handlers are unbound unless the gateway logs at DEBUG (~70 us a slice,
within the A/B's noise). ``bench_ingest`` before and after, the machine slower all session
than in the fifth pass (weed 17-18 CPU ms per instance against 13): 1 association 40.5 vs
99.6 (0.41) and 39.4 vs 111.5 (0.35); 4 associations 54.3 vs 197.4 (0.28) and 54.7 vs
201.6 (0.27).

Profilers: Go pprof from ``weed mini -debug`` (18 s from the first send); ``py-spy record
--gil --nonblocking`` on the gateway and the worker during the 4-association send and its
settle (``--py-spy DIR``), so C work done without the GIL (hashing, sockets, librdkafka) is
under-counted. While sending, radstream is CPU-bound: 17.5 ms of CPU per instance on 2
cores caps it near 110 inst/s; 0.5 x Orthanc (~240 inst/s) needs under ~8 ms.
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
