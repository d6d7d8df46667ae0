"""A general process supervisor: start children in order, watch them, stop them cleanly.

About 590 lines: one state machine (start, readiness, restart with backoff, stop,
reporting) whose parts share the children's state; splitting it would scatter that.

The supervisor owns a list of :class:`ChildSpec` and knows nothing of radstream's own
processes (their table is :mod:`radstream.runtime`); it starts the children one after
another, each only once the previous one answers its readiness check.
Children run in their own process group with a parent-death signal
(:mod:`radstream.procs`), so nothing outlives the supervisor, even when it is SIGKILLed.
A child that dies is restarted with exponential backoff; too many rapid failures shut
the whole runtime down with a non-zero exit. SIGINT/SIGTERM stop the children in
reverse start order (SIGTERM, then SIGKILL after ``runtime.stop_grace_s``). There is no
pidfile lock: ports are checked before anything starts, and ``<data_dir>/run/up.json``
only tells tooling which pids and ports the children have. Each child's log
(``<data_dir>/logs/<child>.log``) is kept under ``runtime.log_max_mb`` by
:func:`rotate_log`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from radstream import procs
from schemas.settings import Settings

log = logging.getLogger("radstream.supervisor")

#: How many lines of a dead child's log the supervisor reports.
LOG_TAIL_LINES = 20
#: How often the watch loop looks at its children.
POLL_INTERVAL_S = 0.1
#: how often the children's logs are checked against ``runtime.log_max_mb``
LOG_CHECK_INTERVAL_S = 2.0


class SupervisorError(RuntimeError):
    """The runtime could not start or had to give up; the message says which child and why."""


class AlreadyRunningError(SupervisorError):
    """Another live supervisor has written ``up.json`` in the same data directory."""


class _Interrupted(Exception):
    """A stop signal arrived while children were still starting."""


# ---------------------------------------------------------------- specs


@dataclass(frozen=True)
class PortClaim:
    """A port a child will listen on, and the setting that moves it."""

    port: int
    setting: str  # environment variable, e.g. RADSTREAM_DICOM_PORT
    what: str  # "the DICOM gateway"
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class RestartPolicy:
    """Restart a dead child after ``backoff_s`` (doubling up to ``max_backoff_s``);
    give up when it failed more than ``max_failures`` times within ``window_s``."""

    restart: bool = True
    max_failures: int = 5
    window_s: float = 60.0
    backoff_s: float = 0.5
    max_backoff_s: float = 15.0

    def delay(self, recent_failures: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(0, recent_failures - 1))


#: ``launch(env, log_path) -> Popen``: for children that need more than ``procs.spawn``.
Launcher = Callable[[Mapping[str, str], Path], subprocess.Popen]


@dataclass(frozen=True)
class ChildSpec:
    """One supervised component.

    ``argv`` (or ``launch``) starts it; ``ready()`` is polled until it returns True
    (exceptions count as "not yet"); ``on_ready`` runs once it is ready, after every
    (re)start (create topics, apply DDL); ``reset`` runs before every spawn and after
    the final stop (remove a stale readiness file). A spec with neither ``argv`` nor ``launch`` is *external*:
    nothing is started, the supervisor only waits for ``ready()`` and runs ``on_ready``.
    """

    name: str
    argv: Sequence[str] | None = None
    ready: Callable[[], bool] | None = None
    restart: RestartPolicy = RestartPolicy()
    ports: Sequence[PortClaim] = ()
    summary: str = ""  # one line for the banner: where it listens
    launch: Launcher | None = None
    reset: Callable[[], None] | None = None
    on_ready: Callable[[], None] | None = None
    ready_timeout_s: float | None = None  # default: settings.runtime.ready_timeout_s
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def external(self) -> bool:
        return self.argv is None and self.launch is None


class ChildState(str, Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPED = "stopped"


@dataclass
class Child:
    spec: ChildSpec
    log_path: Path
    proc: subprocess.Popen | None = None
    state: ChildState = ChildState.STOPPED
    ready_deadline: float = 0.0
    restart_at: float = 0.0
    restarts: int = 0
    failures: list[float] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


# ---------------------------------------------------------------- supervisor


class Supervisor:
    """Start, watch and stop a list of children.

    ``radstream up`` passes radstream's process table (:func:`radstream.runtime.default_specs`);
    tests pass their own ``specs``.
    Call everything from the main thread: ``PR_SET_PDEATHSIG`` fires when the *thread*
    that forked a child ends, so spawning from a worker thread would kill children early.
    """

    def __init__(
        self,
        settings: Settings,
        specs: Sequence[ChildSpec],
        *,
        console: Any = None,
    ) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.resolve()
        self.log_dir = self.data_dir / "logs"
        self.run_dir = self.data_dir / "run"
        self.up_file = self.run_dir / "up.json"
        self.specs = list(specs)
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique: {names}")
        self.children = [Child(spec, self.log_dir / f"{spec.name}.log") for spec in self.specs]
        self.console = console
        self._stop_requested = threading.Event()
        self._signal_name: str | None = None
        self._stopped = True  # nothing to stop until start() gets past its checks
        self.exit_code = 0

    # -- environment ------------------------------------------------------

    def child_env(self, spec: ChildSpec | None = None) -> dict[str, str]:
        """What every child sees: the effective settings, pointing at the running runtime."""
        env = {
            **os.environ,
            **self.settings.to_env(),
            "RADSTREAM_KAFKA_BOOTSTRAP": self.settings.kafka_bootstrap,
            "RADSTREAM_WAREHOUSE_URL": self.settings.warehouse_url,
            "RADSTREAM_DATA_DIR": str(self.data_dir),
        }
        # The config file's values are already in the RADSTREAM_* variables above.
        env.pop("RADSTREAM_CONFIG", None)
        # Log lines must reach the log file before a crash, for the tail we report.
        env.setdefault("PYTHONUNBUFFERED", "1")
        if spec is not None:
            env.update(spec.env)
        return env

    # -- preflight --------------------------------------------------------

    def check_ports(self) -> None:
        """Fail before starting anything if a port is taken or claimed twice."""
        seen: dict[int, PortClaim] = {}
        for spec in self.specs:
            for claim in spec.ports:
                if not claim.port:
                    continue
                if claim.port in seen:
                    other = seen[claim.port]
                    raise procs.PortInUseError(
                        f"{claim.setting} and {other.setting} are both {claim.port}: "
                        f"give {claim.what} and {other.what} different ports"
                    )
                seen[claim.port] = claim
                try:
                    procs.require_free(claim.host, claim.port, claim.what)
                except procs.PortInUseError as exc:
                    raise procs.PortInUseError(f"{exc}; set {claim.setting} to a free port") from None

    def check_not_running(self) -> None:
        """Refuse a second supervisor on one data dir (the embedded warehouse is single-writer)."""
        try:
            info = json.loads(self.up_file.read_text())
            pid, ticks = int(info["supervisor"]["pid"]), info["supervisor"].get("start_ticks")
        except (OSError, ValueError, KeyError, TypeError):
            return
        if pid != os.getpid() and ticks is not None and _start_ticks(pid) == ticks:
            raise AlreadyRunningError(
                f"radstream is already running with data dir {self.data_dir} (supervisor pid {pid}); "
                "stop it first or set RADSTREAM_DATA_DIR to another directory"
            )

    # -- lifecycle ----------------------------------------------------------

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if not self._stop_requested.is_set():
            self._signal_name = signal.Signals(signum).name
        self._stop_requested.set()

    def request_stop(self) -> None:
        self._stop_requested.set()

    def start(self) -> None:
        """Check ports, then start every child in order, each once the previous is ready.

        Raises :class:`procs.PortInUseError` before anything starts, or
        :class:`SupervisorError` (after stopping what had started) when a child fails.
        """
        self.check_not_running()
        self.check_ports()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._stopped = False
        try:
            for child in self.children:
                self._start_child(child)
                while child.state is ChildState.STARTING:
                    if self._stop_requested.is_set():
                        raise _Interrupted
                    self._poll_starting(child, initial=True)
                    if child.state is ChildState.STARTING:
                        time.sleep(POLL_INTERVAL_S)
        except BaseException:
            self.stop()
            raise
        self.write_up_file()

    def run_forever(self) -> int:
        """Watch the children until a stop signal (→ 0) or a child gives up (→ 1)."""
        next_log_check = time.monotonic() + LOG_CHECK_INTERVAL_S
        while not self._stop_requested.wait(POLL_INTERVAL_S):
            if time.monotonic() >= next_log_check:
                self.rotate_logs()
                next_log_check = time.monotonic() + LOG_CHECK_INTERVAL_S
            for child in self.children:
                if child.spec.external:
                    continue
                if child.state is ChildState.RUNNING and child.proc is not None and child.proc.poll() is not None:
                    self._on_death(child, f"exited with code {child.proc.returncode}")
                elif child.state is ChildState.STARTING:
                    self._poll_starting(child, initial=False)
                elif child.state is ChildState.BACKOFF and time.monotonic() >= child.restart_at:
                    log.info("restarting %s (restart %d)", child.spec.name, child.restarts + 1)
                    child.restarts += 1
                    try:
                        self._start_child(child)
                    except Exception as exc:
                        self._on_death(child, f"could not be started: {exc}")
                if self.exit_code:
                    return self.exit_code
        if self._signal_name:
            log.info("received %s; stopping", self._signal_name)
        return self.exit_code

    wait = run_forever

    def rotate_logs(self) -> None:
        """Keep every child's log under ``runtime.log_max_mb`` (:func:`rotate_log`)."""
        limit, keep = int(self.settings.runtime.log_max_mb * 1024 * 1024), self.settings.runtime.log_keep
        for child in self.children:
            try:
                if rotate_log(child.log_path, limit, keep):
                    log.info("rotated the log of %s (over %g MB)", child.spec.name, self.settings.runtime.log_max_mb)
            except OSError as exc:  # a full disk must not stop the supervision
                log.warning("could not rotate %s: %s", child.log_path, exc)

    def stop(self) -> None:
        """Stop children in reverse start order; idempotent; removes ``up.json``."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.runtime.stop_grace_s
        for child in reversed(self.children):
            if child.proc is None or (child.state is ChildState.BACKOFF and child.proc.poll() is not None):
                continue  # never started, or already dead and reaped by _on_death
            log.info("stopping %s (pid %d)", child.spec.name, child.proc.pid)
            code = procs.stop(child.proc, grace)
            if code is None:
                log.warning("%s (pid %d) did not exit after SIGKILL", child.spec.name, child.proc.pid)
            child.state = ChildState.STOPPED
        for child in self.children:
            if child.spec.reset is not None and child.proc is not None:
                try:
                    child.spec.reset()
                except Exception as exc:
                    log.warning("cleaning up after %s failed: %s", child.spec.name, exc)
        try:
            self.up_file.unlink()
        except FileNotFoundError:
            pass

    def run(self, after_ready: Callable[[], None] | None = None) -> int:
        """``radstream up``: signals, start, banner, watch, stop. Returns the exit code.

        ``after_ready`` (``up --demo``) runs in a thread once everything is ready; it must
        not start supervised processes (see the class docstring). Its failure is logged,
        the runtime keeps running. :class:`procs.PortInUseError` propagates (the CLI
        turns it into exit code 2).
        """
        self.install_signal_handlers()
        try:
            self.start()
        except _Interrupted:
            log.info("stopped while starting")
            return 0
        except SupervisorError as exc:
            if isinstance(exc, AlreadyRunningError):
                raise
            log.error("%s", exc)
            return 1
        try:
            self.print_banner()
            if after_ready is not None:
                threading.Thread(target=self._after_ready, args=(after_ready,), name="after-ready",
                                 daemon=True).start()
            return self.run_forever()
        finally:
            self.stop()

    @staticmethod
    def _after_ready(task: Callable[[], None]) -> None:
        try:
            task()
        except Exception:
            log.exception("the after-start task failed; radstream keeps running")

    # -- one child ----------------------------------------------------------

    def _ready_timeout(self, spec: ChildSpec) -> float:
        return spec.ready_timeout_s or self.settings.runtime.ready_timeout_s

    def _start_child(self, child: Child) -> None:
        spec = child.spec
        child.proc = None
        if spec.reset is not None:
            spec.reset()
        if not spec.external:
            with open(child.log_path, "a") as fh:
                stamp = datetime.now(UTC).isoformat(timespec="seconds")
                fh.write(f"----- radstream up: starting {spec.name} at {stamp} -----\n")
            env = self.child_env(spec)
            if spec.launch is not None:
                child.proc = spec.launch(env, child.log_path)
            else:
                child.proc = procs.spawn(list(spec.argv or ()), env=env, log_path=child.log_path)
            log.info("started %s (pid %d)", spec.name, child.proc.pid)
        else:
            log.info("checking %s", spec.name)
        child.state = ChildState.STARTING
        child.ready_deadline = time.monotonic() + self._ready_timeout(spec)

    def _poll_starting(self, child: Child, *, initial: bool) -> None:
        """One readiness check; moves the child to RUNNING, or handles the failure."""
        spec = child.spec
        if child.proc is not None and child.proc.poll() is not None:
            self._fail_start(child, f"exited with code {child.proc.returncode} before it was ready", initial)
            return
        ready = True
        if spec.ready is not None:
            try:
                ready = bool(spec.ready())
            except Exception as exc:  # a refused connection is just "not yet"
                log.debug("%s not ready yet: %s", spec.name, exc)
                ready = False
        if not ready:
            if time.monotonic() >= child.ready_deadline:
                self._fail_start(child, f"was not ready after {self._ready_timeout(spec):.0f}s", initial)
            return
        if spec.on_ready is not None:
            try:
                spec.on_ready()
            except Exception as exc:
                self._fail_start(child, f"became ready but its setup failed: {exc}", initial)
                return
        child.state = ChildState.RUNNING
        log.info("%s is ready", spec.name)
        if not initial:
            self.write_up_file()

    def _fail_start(self, child: Child, why: str, initial: bool) -> None:
        if initial:
            message = f"{child.spec.name} {why}"
            if not child.spec.external:
                message += f"\n{self._tail_text(child)}"
            raise SupervisorError(message)
        self._on_death(child, why)

    def _on_death(self, child: Child, why: str) -> None:
        spec = child.spec
        pid = child.pid
        if child.proc is not None:
            procs.stop(child.proc, 0)  # reap it and anything left in its process group
        log.error("%s (pid %s) %s\n%s", spec.name, pid, why, self._tail_text(child))
        now = time.monotonic()
        child.failures = [t for t in child.failures if now - t < spec.restart.window_s] + [now]
        if not spec.restart.restart or len(child.failures) > spec.restart.max_failures:
            log.error(
                "%s failed %d times within %.0fs; giving up and shutting radstream down",
                spec.name, len(child.failures), spec.restart.window_s,
            )
            child.state = ChildState.STOPPED
            self.exit_code = 1
            return
        delay = spec.restart.delay(len(child.failures))
        log.warning("restarting %s in %.1fs (failure %d of at most %d within %.0fs)",
                    spec.name, delay, len(child.failures), spec.restart.max_failures, spec.restart.window_s)
        child.state = ChildState.BACKOFF
        child.restart_at = now + delay

    def _tail_text(self, child: Child) -> str:
        lines = tail(child.log_path, LOG_TAIL_LINES)
        if not lines:
            return f"  (log {child.log_path} is empty)"
        head = f"  last {len(lines)} lines of {child.log_path}:"
        return "\n".join([head, *(f"    | {line}" for line in lines)])

    # -- reporting ------------------------------------------------------------

    def write_up_file(self) -> None:
        """``<data_dir>/run/up.json``: pids, ports and logs of the children, for tooling."""
        info = {
            "supervisor": {"pid": os.getpid(), "start_ticks": _start_ticks(os.getpid())},
            "data_dir": str(self.data_dir),
            "kafka_bootstrap": self.settings.kafka_bootstrap,
            "warehouse_url": self.settings.warehouse_url,
            "children": {
                c.spec.name: {
                    "pid": c.pid,
                    "state": c.state.value,
                    "ports": [claim.port for claim in c.spec.ports if claim.port],
                    "log": str(c.log_path),
                    "restarts": c.restarts,
                }
                for c in self.children
                if not c.spec.external
            },
            "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        tmp = self.up_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(self.up_file)

    def print_banner(self) -> None:
        """Where everything listens; plain lines so a log file or a pipe keeps them whole."""
        from rich.console import Console
        from rich.markup import escape

        console = self.console or Console()
        width = max(len(c.spec.name) for c in self.children) if self.children else 8
        width = max(width, len("data dir"))

        def line(label: str, text: str, note: str = "") -> None:
            note = f"  [dim]{escape(note)}[/]" if note else ""
            console.print(f"  [bold]{label:<{width}}[/]  {escape(text)}{note}", soft_wrap=True, highlight=False)

        for child in self.children:
            note = f"pid {child.pid}" if child.pid else ("external" if child.spec.external else "")
            line(child.spec.name, child.spec.summary, note)
        metrics = self.settings.metrics
        line("metrics", f"gateway :{metrics.gateway_port or 'off'}  worker :{metrics.worker_port or 'off'}")
        line("data dir", str(self.data_dir))
        line("logs", str(self.log_dir))
        console.print("[bold green]radstream is ready[/] (Ctrl-C to stop)", soft_wrap=True)


def rotate_log(path: Path, max_bytes: int, keep: int) -> bool:
    """Once ``path`` is over ``max_bytes``, copy it to ``path.1`` (``.1`` .. ``.keep-1``
    moving up one, the oldest dropped) and empty it in place; True if it did.

    Copy-truncate, as logrotate's ``copytruncate``: a child writes its log through the
    descriptor it was started with, opened for appending (:func:`radstream.procs.spawn`),
    so it goes on writing at the start of the emptied file, and no restart is needed.
    Lines written during the copy may be lost.
    """
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    for number in range(keep, 1, -1):
        older = path.with_name(f"{path.name}.{number - 1}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{number}"))
    if keep:
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    os.truncate(path, 0)
    return True


def tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of a text file (reads at most the last 64 KiB)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            data = fh.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:]


def _start_ticks(pid: int) -> int | None:
    """Process start time in clock ticks (``/proc/PID/stat`` field 22): pid + this is unique."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


# ---------------------------------------------------------------- readiness checks


def connect_host(bind_host: str) -> str:
    """Where to connect to reach a listener bound to ``bind_host``."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(bind_host, bind_host)


def port_ready(host: str, port: int) -> Callable[[], bool]:
    return lambda: procs.port_open(connect_host(host), port, timeout_s=0.5)


def http_ping_ready(base_url: str, timeout_s: float = 2.0) -> Callable[[], bool]:
    """ClickHouse's ``GET /ping`` answers ``Ok.`` when the server is up."""
    url = base_url.rstrip("/") + "/ping"

    def check() -> bool:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status == 200 and resp.read().strip().startswith(b"Ok")

    return check


def file_ready(path: Path) -> Callable[[], bool]:
    return path.exists


def kafka_ready(bootstrap: str, timeout_s: float = 2.0) -> Callable[[], bool]:
    """An external broker is ready when it answers a metadata request."""

    def check() -> bool:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
        admin.list_topics(timeout=timeout_s)
        return True

    return check
