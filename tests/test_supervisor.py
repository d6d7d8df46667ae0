"""`radstream up`: children start in order, die with the supervisor, restart, stop cleanly.

The supervision mechanics are checked with real processes: the real Tansu broker plus
small Python TCP servers standing in for the other components, supervised by a
:class:`Supervisor` running in its own process so it can be SIGKILLed and SIGTERMed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from radstream import procs
from radstream.supervisor import AlreadyRunningError, ChildSpec, PortClaim, RestartPolicy, Supervisor, rotate_log
from schemas.settings import Settings

REPO = Path(__file__).resolve().parents[1]

#: A stand-in component: listens on a port; ``crash-once`` dies 0.5 s after its first
#: start (leaving a marker file), ``crash-always`` after every start.
SERVER = """
import os, socket, sys, time
port, mode, tag = int(sys.argv[1]), sys.argv[2], sys.argv[3]
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", port))
sock.listen()
print(f"listening on {port}", flush=True)
if mode == "mute":  # never gets ready
    print("warming up", flush=True)
    time.sleep(600)
if mode == "chatty":  # a busy gateway's log: ~200 kB/s of numbered lines
    for number in range(10**9):
        print(f"line {number:09d} " + "x" * 90, flush=True)
        time.sleep(0.0005)
marker = os.path.join(tag, f"crashed-{port}")
if mode == "crash-always" or (mode == "crash-once" and not os.path.exists(marker)):
    open(marker, "w").close()
    time.sleep(0.5)
    print(f"boom: simulated failure of the component on {port}", flush=True)
    sys.exit(3)
while True:
    conn, _ = sock.accept()
    conn.close()
"""

#: Runs a Supervisor over the broker (optional) and stand-in children described in a JSON plan.
SUPERVISOR = """
import json, logging, sys
from radstream import procs, runtime, supervisor as sv
from schemas.settings import load_settings

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
plan = json.loads(open(sys.argv[1]).read())
settings = load_settings()
specs = [runtime.broker_spec(settings)] if plan["broker"] else []
for child in plan["children"]:
    specs.append(sv.ChildSpec(
        name=child["name"],
        argv=[sys.executable, "-c", plan["server"], str(child["port"]), child["mode"], plan["tag"]],
        ready=sv.port_ready("127.0.0.1", child["port"]),
        ports=[sv.PortClaim(child["port"], "RADSTREAM_TEST_" + child["name"].upper(), child["name"])],
        summary=f"127.0.0.1:{child['port']}",
        restart=sv.RestartPolicy(max_failures=child.get("max_failures", 5), backoff_s=0.2, window_s=60),
    ))
try:
    sys.exit(sv.Supervisor(settings, specs).run())
except procs.PortInUseError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


# ---------------------------------------------------------------- helpers


def _alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (reparented children may not be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _tagged_pids(tag: str) -> list[int]:
    """Live processes whose command line mentions ``tag`` (the test's tmp dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if tag in cmdline and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None,
              logs: tuple[Path, ...] = ()) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None and not predicate():
            break
        time.sleep(0.05)
    detail = "\n".join(f"--- {p.name}\n{p.read_text() if p.exists() else ''}" for p in logs)
    raise AssertionError(f"timed out waiting for {what}\n{detail}")


class Run:
    """A supervisor process with its stdout/stderr in files."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, tmp: Path) -> None:
        self.out, self.err = tmp / "up.stdout", tmp / "up.stderr"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)

    @property
    def stdout(self) -> str:
        return self.out.read_text()

    @property
    def stderr(self) -> str:
        return self.err.read_text()

    def wait_ready(self, timeout_s: float = 30) -> None:
        _wait_for(lambda: "radstream is ready" in self.stdout, timeout_s, "'radstream is ready'",
                  self.proc, (self.out, self.err))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    # Tansu ignores SIGTERM, so every stop of it waits the whole grace period.
    return {**os.environ, **settings.to_env(), "RADSTREAM_RUNTIME_STOP_GRACE_S": "1"}


@pytest.fixture
def supervise(settings: Settings, env: dict[str, str], tmp_path: Path) -> Iterator:
    """Start a supervisor process over the broker and the given stand-in children."""
    runs: list[Run] = []

    def start(children: list[dict], broker: bool = True) -> Run:
        plan = {"broker": broker, "children": children, "server": SERVER, "tag": str(tmp_path)}
        (tmp_path / "plan.json").write_text(json.dumps(plan))
        (tmp_path / "sup.py").write_text(SUPERVISOR)
        run = Run([sys.executable, str(tmp_path / "sup.py"), str(tmp_path / "plan.json")], env, REPO, tmp_path)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.kill()
    for pid in _tagged_pids(str(tmp_path)):
        os.kill(pid, signal.SIGKILL)


def _up_json(settings: Settings) -> dict:
    return json.loads((settings.data_dir.resolve() / "run" / "up.json").read_text())


def _listeners(settings: Settings, *ports: int) -> list[int]:
    return [settings.kafka.embedded_port, *ports]


def _assert_nothing_left(pids: list[int], ports: list[int], tag: str, timeout_s: float = 10) -> None:
    _wait_for(lambda: not any(_alive(p) for p in pids) and not _tagged_pids(tag), timeout_s, "children to die")
    _wait_for(lambda: all(procs.port_is_free("127.0.0.1", p) for p in ports), timeout_s, "ports to be free")


# ---------------------------------------------------------------- supervision


def test_sigkilled_supervisor_takes_every_child_with_it(supervise, settings: Settings, tmp_path: Path) -> None:
    a, b = procs.free_port(), procs.free_port()
    run = supervise([{"name": "alpha", "port": a, "mode": "forever"}, {"name": "beta", "port": b, "mode": "forever"}])
    run.wait_ready()
    up = _up_json(settings)
    pids = [child["pid"] for child in up["children"].values()]
    assert set(up["children"]) == {"broker", "alpha", "beta"} and all(_alive(p) for p in pids)
    assert all(procs.port_open("127.0.0.1", p) for p in _listeners(settings, a, b))

    run.proc.send_signal(signal.SIGKILL)
    run.proc.wait()

    _assert_nothing_left(pids, _listeners(settings, a, b), str(tmp_path))


def test_sigterm_stops_children_in_reverse_order_and_exits_0(supervise, settings: Settings, tmp_path: Path) -> None:
    a, b = procs.free_port(), procs.free_port()
    run = supervise([{"name": "alpha", "port": a, "mode": "forever"}, {"name": "beta", "port": b, "mode": "forever"}])
    run.wait_ready()
    assert f"127.0.0.1:{settings.kafka.embedded_port}" in run.stdout and "durable: no" in run.stdout
    pids = [child["pid"] for child in _up_json(settings)["children"].values()]

    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(timeout=30) == 0, run.stderr

    _assert_nothing_left(pids, _listeners(settings, a, b), str(tmp_path), timeout_s=1)
    assert not (settings.data_dir / "run" / "up.json").exists()
    stopping = [line.split("stopping ")[1].split()[0] for line in run.stderr.splitlines() if ": stopping " in line]
    assert stopping == ["beta", "alpha", "broker"]


def test_a_child_that_dies_is_restarted_and_its_log_tail_reported(supervise, settings: Settings) -> None:
    a, b = procs.free_port(), procs.free_port()
    run = supervise([{"name": "alpha", "port": a, "mode": "forever"},
                     {"name": "beta", "port": b, "mode": "crash-once"}], broker=False)
    run.wait_ready()
    first_pid = _up_json(settings)["children"]["beta"]["pid"]

    _wait_for(lambda: _up_json(settings)["children"]["beta"]["restarts"] == 1
              and _up_json(settings)["children"]["beta"]["state"] == "running", 15, "beta to be restarted",
              run.proc, (run.err,))

    beta = _up_json(settings)["children"]["beta"]
    assert beta["pid"] != first_pid and _alive(beta["pid"]) and not _alive(first_pid)
    assert procs.port_open("127.0.0.1", b)
    assert f"beta (pid {first_pid}) exited with code 3" in run.stderr
    assert f"boom: simulated failure of the component on {b}" in run.stderr  # the log tail
    assert "restarting beta" in run.stderr
    log = (settings.data_dir / "logs" / "beta.log").read_text()
    assert log.count("starting beta") == 2

    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(timeout=30) == 0


def test_a_childs_log_is_rotated_under_its_limit_while_the_child_writes_on(supervise, settings: Settings,
                                                                           env: dict[str, str]) -> None:
    """The gateways log a line per instance: a runtime's logs grew without bound."""
    env.update(RADSTREAM_RUNTIME_LOG_MAX_MB="0.1", RADSTREAM_RUNTIME_LOG_KEEP="2")
    run = supervise([{"name": "chatty", "port": procs.free_port(), "mode": "chatty"}], broker=False)
    run.wait_ready()
    logs = settings.data_dir / "logs"
    _wait_for(lambda: (logs / "chatty.log.2").exists(), 30, "two rotations", run.proc, (run.err,))
    time.sleep(2.5)  # a check after the second rotation: the oldest copy is dropped, not moved up
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(timeout=30) == 0
    assert "rotated the log of chatty" in run.stderr
    assert not (logs / "chatty.log.3").exists()
    current, newer, older = ((logs / name).read_bytes() for name in ("chatty.log", "chatty.log.1", "chatty.log.2"))
    # the child appended on at the start of the emptied file: no hole of NULs before its lines
    assert b"\0" not in current and current.startswith((b"line ", b"-----"))
    # every copy is about the limit (it was over it when copied), the current file under it
    # plus what one check interval adds
    assert all(100 * 1024 < len(copy) < 1024 * 1024 for copy in (newer, older))
    assert len(current) < 1024 * 1024

    def numbers(data: bytes) -> list[int]:  # whole lines only: a copy may end inside one
        return [int(m.group(1)) for m in re.finditer(rb"^line (\d{9}) x{90}$", data, re.MULTILINE)]

    # in order across the files, nothing written twice
    assert numbers(older)[-1] < numbers(newer)[0] and numbers(newer)[-1] < numbers(current)[0]


def test_rotating_a_log_keeps_as_many_copies_as_asked(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    log.write_bytes(b"x" * 10)
    assert not rotate_log(log, 10, 2) and log.read_bytes() == b"x" * 10  # at the limit: left alone
    log.write_bytes(b"a" * 11)
    assert rotate_log(log, 10, 2) and log.read_bytes() == b"" and (tmp_path / "child.log.1").read_bytes() == b"a" * 11
    log.write_bytes(b"b" * 11)
    assert rotate_log(log, 10, 2)
    assert (tmp_path / "child.log.1").read_bytes() == b"b" * 11 and (tmp_path / "child.log.2").read_bytes() == b"a" * 11
    log.write_bytes(b"c" * 11)
    assert rotate_log(log, 10, 0) and log.read_bytes() == b""  # no copies: emptied only
    assert (tmp_path / "child.log.1").read_bytes() == b"b" * 11
    assert not rotate_log(tmp_path / "missing.log", 10, 2)


def test_a_child_that_keeps_dying_shuts_everything_down_with_exit_1(supervise, settings: Settings,
                                                                     tmp_path: Path) -> None:
    a, b = procs.free_port(), procs.free_port()
    run = supervise([{"name": "alpha", "port": a, "mode": "forever"},
                     {"name": "beta", "port": b, "mode": "crash-always", "max_failures": 2}])
    run.wait_ready()
    pids = [child["pid"] for child in _up_json(settings)["children"].values()]

    assert run.proc.wait(timeout=60) == 1, run.stderr
    assert "beta failed 3 times" in run.stderr and "giving up" in run.stderr
    _assert_nothing_left(pids, _listeners(settings, a, b), str(tmp_path), timeout_s=1)


def test_sigterm_while_children_are_starting_stops_them_and_exits_0(supervise, settings: Settings,
                                                                    tmp_path: Path) -> None:
    a, b = procs.free_port(), procs.free_port()
    run = supervise([{"name": "alpha", "port": a, "mode": "forever"}, {"name": "slow", "port": b, "mode": "mute"}])
    _wait_for(lambda: "started slow" in run.stderr, 30, "slow to be started", run.proc, (run.err,))
    pids = [int(line.split("(pid ")[1].rstrip(")")) for line in run.stderr.splitlines() if ": started " in line]

    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(timeout=30) == 0, run.stderr

    assert "radstream is ready" not in run.stdout
    _assert_nothing_left(pids, _listeners(settings, a), str(tmp_path), timeout_s=1)


def test_a_second_supervisor_on_the_same_data_dir_is_refused(supervise, settings: Settings, tmp_path: Path) -> None:
    run = supervise([{"name": "alpha", "port": procs.free_port(), "mode": "forever"}], broker=False)
    run.wait_ready()
    up_before = _up_json(settings)
    again = Supervisor(settings, [ChildSpec("beta", argv=["true"])])
    with pytest.raises(AlreadyRunningError, match=f"supervisor pid {run.proc.pid}"):
        again.start()
    assert _up_json(settings) == up_before  # the running one's up.json is left alone


def test_a_taken_port_fails_before_anything_starts_naming_port_and_setting(settings: Settings,
                                                                          env: dict[str, str]) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", settings.dicom.port))
        squatter.listen()
        done = subprocess.run([sys.executable, "-m", "radstream", "up"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"127.0.0.1:{settings.dicom.port}" in done.stderr and "RADSTREAM_DICOM_PORT" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert procs.port_is_free("127.0.0.1", settings.kafka.embedded_port)  # the broker never started


def test_two_components_on_one_port_are_refused_naming_both_settings(settings: Settings) -> None:
    port = procs.free_port()
    specs = [
        ChildSpec("alpha", argv=["true"], ports=[PortClaim(port, "RADSTREAM_A_PORT", "alpha")]),
        ChildSpec("beta", argv=["true"], ports=[PortClaim(port, "RADSTREAM_B_PORT", "beta")]),
    ]
    with pytest.raises(procs.PortInUseError, match="RADSTREAM_B_PORT and RADSTREAM_A_PORT are both"):
        Supervisor(settings, specs).check_ports()


def test_restart_backoff_doubles_up_to_its_cap() -> None:
    policy = RestartPolicy(backoff_s=0.5, max_backoff_s=3)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3, 3]


def test_a_child_that_never_gets_ready_fails_start_with_its_log(settings: Settings) -> None:
    port = procs.free_port()
    settings.runtime.ready_timeout_s = 1
    warming_up = "print('warming up', flush=True); import time; time.sleep(60)"
    specs = [ChildSpec("mute", argv=[sys.executable, "-c", warming_up],
                       ready=lambda: procs.port_open("127.0.0.1", port))]
    supervisor = Supervisor(settings, specs)
    with pytest.raises(Exception, match=r"(?s)mute was not ready after 1s.*warming up"):
        supervisor.start()
    assert supervisor.children[0].proc is not None and supervisor.children[0].proc.poll() is not None


# ---------------------------------------------------------------- the real runtime

@pytest.mark.integration
def test_radstream_up_runs_the_whole_runtime_and_stops_clean(settings: Settings, env: dict[str, str],
                                                             tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    run = Run([sys.executable, "-m", "radstream", "up", "--demo"], env, tmp_path, tmp_path)
    try:
        run.wait_ready(timeout_s=120)
        up = _up_json(settings)
        pids = [child["pid"] for child in up["children"].values()]
        assert set(up["children"]) == {"broker", "warehouse", "worker", "inference", "dicom-gateway",
                                           "hl7-gateway", "stow-gateway", "reading-api"}
        assert f"RADSTREAM@127.0.0.1:{settings.dicom.port}" in run.stdout

        _wait_for(lambda: "studies on the worklist" in run.stdout, 120, "the demo's worklist", run.proc,
                  (run.out, run.err))
        assert "failed 0" in run.stdout and "ROUTINE" in run.stdout
        # the demo's painted head CT: the AI's critical finding tops the worklist
        table = run.stdout.split("worklist:", 1)[1]
        first_row = next(line for line in table.splitlines() if "CRITICAL" in line or "URGENT" in line
                         or "ROUTINE" in line)
        assert "CRITICAL" in first_row and "hemorrhage" in table, table

        sent = subprocess.run(
            [sys.executable, "-m", "radstream", "send", get_testdata_file("CT_small.dcm", download=False),
             "--no-progress"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )
        assert sent.returncode == 0 and "sent 1, failed 0" in sent.stdout, sent.stdout + sent.stderr

        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(timeout=60) == 0, run.stderr
        ports = [settings.kafka.embedded_port, settings.warehouse.embedded_port, settings.dicom.port,
                 settings.worker.web_port]
        _assert_nothing_left(pids, ports, str(tmp_path), timeout_s=5)
        assert not (settings.data_dir / "run" / "up.json").exists()
        assert not (settings.data_dir / "run" / "worker.ready").exists()
        assert not (settings.data_dir / "run" / "inference.ready").exists()
    finally:
        run.kill()


@pytest.mark.integration
def test_sigkill_of_the_whole_runtime_leaves_no_process_or_port(settings: Settings, env: dict[str, str],
                                                                tmp_path: Path) -> None:
    """SIGKILL gives the supervisor no chance to clean up: the children's parent-death
    signal must take broker, warehouse, workers and gateways down on their own (and the AI
    worker's decode processes with it)."""
    run = Run([sys.executable, "-m", "radstream", "up"], env, tmp_path, tmp_path)
    try:
        run.wait_ready(timeout_s=120)
        children = _up_json(settings)["children"]
        assert set(children) == {"broker", "warehouse", "worker", "inference", "dicom-gateway", "hl7-gateway",
                                 "stow-gateway", "reading-api"}
        pids = [child["pid"] for child in children.values()]
        run.proc.send_signal(signal.SIGKILL)
        run.proc.wait(timeout=10)
        ports = [settings.kafka.embedded_port, settings.warehouse.embedded_port, settings.dicom.port,
                 settings.worker.web_port, settings.hl7.port, settings.stow.port, settings.reading.port]
        _assert_nothing_left(pids, ports, str(tmp_path), timeout_s=15)
    finally:
        run.kill()
