"""radstream's own process table: what ``radstream up`` starts, in which order, and how
each child is known to be ready.

Object store (SeaweedFS) → broker (Tansu on ``s3://``) → warehouse (chDB endpoint) →
stream worker → AI worker → gateways (last: they listen only once they can publish). Each entry is
a :class:`~radstream.supervisor.ChildSpec` for the general supervisor; an external
server configured in the settings (``kafka.bootstrap``, ``warehouse.url``, an S3
endpoint) becomes a readiness check without a process.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from radstream import procs
from radstream.supervisor import (
    ChildSpec,
    PortClaim,
    Supervisor,
    SupervisorError,
    connect_host,
    file_ready,
    http_ping_ready,
    kafka_ready,
    port_ready,
)
from schemas.settings import Settings

log = logging.getLogger("radstream.runtime")


def _unlink(path: Path) -> Callable[[], None]:
    def remove() -> None:
        path.unlink(missing_ok=True)

    return remove


def _apply_ddl(settings: Settings) -> None:
    from adapters import warehouse

    warehouse.apply_ddl(settings)
    log.info("warehouse DDL applied")


def broker_spec(settings: Settings) -> ChildSpec:
    """The embedded Tansu broker, or a readiness check of ``kafka.bootstrap``."""
    from adapters.kafka import ensure_topics

    def create_topics() -> None:
        created = ensure_topics(settings)
        if created:
            log.info("created %d topics", len(created))

    if not settings.embedded_kafka:
        return ChildSpec(
            name="broker",
            ready=kafka_ready(settings.kafka_bootstrap),
            on_ready=create_topics,
            summary=f"{settings.kafka_bootstrap}  (external Kafka)",
        )
    host, port, storage = settings.bind_host, settings.kafka.embedded_port, settings.kafka.storage
    durable = "no, topics are lost when it stops" if storage.startswith("memory:") else "yes"
    storage_env: dict[str, str] = {}
    if storage.startswith("s3://"):
        if settings.blobs.backend != "s3":
            raise SupervisorError(
                f"kafka.storage {storage} keeps the broker's log on the object store, but blobs.backend is "
                f"{settings.blobs.backend!r}: set RADSTREAM_KAFKA_STORAGE=memory://tansu/ or use the S3 backend"
            )
        from radstream.objectstore import tansu_env
        from adapters.s3 import load_credentials

        storage_env = tansu_env(settings, load_credentials(settings))

    def launch(env: Mapping[str, str], log_path: Path) -> subprocess.Popen:
        return procs.start_tansu(host, port, storage, log_path=log_path, env=env)

    return ChildSpec(
        name="broker",
        launch=launch,
        ready=port_ready(host, port),
        on_ready=create_topics,
        env=storage_env,
        ports=[PortClaim(port, "RADSTREAM_KAFKA_EMBEDDED_PORT", "the embedded Kafka broker (tansu)", host)],
        summary=f"{settings.kafka_bootstrap}  (embedded tansu, storage {storage}, durable: {durable})",
    )


def warehouse_spec(settings: Settings) -> ChildSpec:
    """The embedded chDB-backed ClickHouse endpoint, or a ping of ``warehouse.url``."""
    apply = lambda: _apply_ddl(settings)  # noqa: E731
    if not settings.embedded_warehouse:
        return ChildSpec(
            name="warehouse",
            ready=http_ping_ready(settings.warehouse_url),
            on_ready=apply,
            summary=f"{settings.warehouse_url}  (external ClickHouse, database {settings.warehouse.database})",
        )
    host, port = settings.bind_host, settings.warehouse.embedded_port
    return ChildSpec(
        name="warehouse",
        argv=procs.python_module("radstream.warehouse_server"),
        ready=http_ping_ready(f"http://{connect_host(host)}:{port}"),
        on_ready=apply,
        ports=[PortClaim(port, "RADSTREAM_WAREHOUSE_EMBEDDED_PORT", "the embedded warehouse", host)],
        summary=f"{settings.warehouse_url}  (embedded chDB, database {settings.warehouse.database})",
    )


def worker_spec(settings: Settings) -> ChildSpec:
    """The Faust worker; it touches ``run/worker.ready`` once it owns its partitions."""
    ready_file = settings.data_dir.resolve() / "run" / "worker.ready"
    host = settings.bind_host
    ports = [
        PortClaim(settings.worker.web_port, "RADSTREAM_WORKER_WEB_PORT", "the stream worker's web server", host),
        PortClaim(settings.metrics.worker_port, "RADSTREAM_METRICS_WORKER_PORT", "the stream worker's metrics", host),
    ]
    web = f"web {host}:{settings.worker.web_port}" if settings.worker.web_port else "web off"
    return ChildSpec(
        name="worker",
        argv=procs.python_module("streams", "worker"),
        ready=file_ready(ready_file),
        reset=_unlink(ready_file),
        ports=ports,
        summary=f"faust worker, {web}, consumer session timeout {settings.kafka.session_timeout_s:g}s",
    )


def inference_spec(settings: Settings) -> ChildSpec:
    """The AI pre-read worker (its own consumer group); ready once it owns its partitions."""
    ready_file = settings.data_dir.resolve() / "run" / "inference.ready"
    host, ai = settings.bind_host, settings.ai
    return ChildSpec(
        name="inference",
        argv=procs.python_module("streams", "inference"),
        ready=file_ready(ready_file),
        reset=_unlink(ready_file),
        ports=[PortClaim(settings.metrics.inference_port, "RADSTREAM_METRICS_INFERENCE_PORT",
                         "the AI worker's metrics", host)],
        summary=f"AI pre-read, backend {ai.backend}, budget {ai.latency_budget_s:g}s, "
                f"batches of {ai.max_batch_images} images / {ai.max_batch_delay_ms:g} ms",
    )


def delivery_spec(settings: Settings) -> ChildSpec:
    """Results delivery (its own consumer group): ready once it owns the outbox's partitions."""
    ready_file = settings.data_dir.resolve() / "run" / "delivery.ready"
    results = settings.results
    return ChildSpec(
        name="delivery",
        argv=procs.python_module("streams", "delivery"),
        ready=file_ready(ready_file),
        reset=_unlink(ready_file),
        summary=f"results out to the destinations of {results.destinations_file}, up to {results.max_attempts} "
                f"attempts each, circuit opens after {results.breaker_failures} failures",
    )


def gateway_specs(settings: Settings) -> list[ChildSpec]:
    """The gateways, each ready once it listens: the DICOM C-STORE/C-ECHO SCP (PS3.4 Annex B),
    the HL7 v2 MLLP listener for orders and ADT updates (HL7 v2.5 Appendix C) and the
    DICOMweb STOW-RS endpoint (PS3.18 10.5, HTTPS when ``stow.tls_cert``/``tls_key`` are set)
    and the reading API (readers' actions in, the worklist out; :mod:`gateways.reading_api`)."""
    host, metrics = settings.bind_host, settings.metrics
    scheme = "https" if settings.stow.tls_cert and settings.stow.tls_key else "http"
    reading_scheme = "https" if settings.reading.tls_cert and settings.reading.tls_key else "http"
    table = [  # name, module, (port, variable, what), (metrics port, variable, what), summary
        ("dicom-gateway", "gateways.dicom_scp", (settings.dicom.port, "RADSTREAM_DICOM_PORT", "the DICOM gateway"),
         (metrics.gateway_port, "RADSTREAM_METRICS_GATEWAY_PORT", "the gateway's metrics"),
         f"{settings.dicom.ae_title}@{host}:{settings.dicom.port}  (DICOM C-STORE/C-ECHO)"),
        ("hl7-gateway", "gateways.hl7_mllp", (settings.hl7.port, "RADSTREAM_HL7_PORT", "the HL7 MLLP gateway"),
         (metrics.hl7_gateway_port, "RADSTREAM_METRICS_HL7_GATEWAY_PORT", "the HL7 MLLP gateway's metrics"),
         f"{host}:{settings.hl7.port}  (HL7 v2 MLLP: {settings.hl7.message_types})"),
        ("stow-gateway", "gateways.stow_rs", (settings.stow.port, "RADSTREAM_STOW_PORT", "the STOW-RS gateway"),
         (metrics.stow_gateway_port, "RADSTREAM_METRICS_STOW_GATEWAY_PORT", "the STOW-RS gateway's metrics"),
         f"{scheme}://{host}:{settings.stow.port}/dicomweb  (DICOMweb STOW-RS, bearer tokens)"),
        ("reading-api", "gateways.reading_api", (settings.reading.port, "RADSTREAM_READING_PORT", "the reading API"),
         (metrics.reading_port, "RADSTREAM_METRICS_READING_PORT", "the reading API's metrics"),
         f"{reading_scheme}://{host}:{settings.reading.port}/api/v1  (reading API: readers, admins, analysts)"),
    ]
    return [
        ChildSpec(name=name, argv=procs.python_module(module), ready=port_ready(host, port[0]),
                  ports=[PortClaim(*port, host), PortClaim(*metrics_port, host)], summary=summary)
        for name, module, port, metrics_port, summary in table
    ]


def objectstore_spec(settings: Settings) -> ChildSpec | None:
    """The embedded SeaweedFS, or a readiness check of ``blobs.s3_endpoint``; None with
    the local (test-only) blob backend."""
    if settings.blobs.backend != "s3":
        return None
    from radstream import objectstore
    from adapters.s3 import S3BlobStore, ensure_embedded_credentials, load_credentials, open_s3_store

    def ensure_buckets() -> bool:
        store = open_s3_store(settings)
        store.ensure_bucket()
        for bucket in objectstore.buckets(settings)[1:]:
            S3BlobStore(endpoint=settings.s3_endpoint, bucket=bucket, credentials=load_credentials(settings),
                        region=settings.blobs.s3_region, verify=settings.blobs.s3_verify_tls).ensure_bucket()
        return True

    if not settings.embedded_objectstore:
        return ChildSpec(
            name="objectstore", ready=ensure_buckets,
            summary=f"{settings.s3_endpoint}  (external S3, bucket {settings.blobs.bucket})",
        )
    credentials = ensure_embedded_credentials(settings)
    host = settings.bind_host
    claims = [
        PortClaim(port, "RADSTREAM_SEAWEEDFS_S3_PORT" if flag == "s3.port" else "RADSTREAM_SEAWEEDFS_PORT_BASE",
                  f"the embedded object store (SeaweedFS {flag})", host)
        for flag, port in objectstore.ports(settings).items()
    ]
    return ChildSpec(
        name="objectstore",
        argv=objectstore.argv(settings),
        env=objectstore.env(credentials),
        ready=ensure_buckets,
        reset=lambda: objectstore.remove_sockets(settings),
        ports=claims,
        summary=f"{settings.s3_endpoint}  (embedded SeaweedFS, bucket {settings.blobs.bucket}, "
                f"credentials {credentials_file(settings)})",
    )


def credentials_file(settings: Settings) -> Path:
    from adapters.s3 import credentials_path

    return credentials_path(settings)


def default_specs(settings: Settings) -> list[ChildSpec]:
    """The radstream runtime, in start order: object store, broker (its log may live on
    the object store), warehouse, workers, and the gateways last, so that they listen only
    once they can publish."""
    store = objectstore_spec(settings)
    return [
        *([store] if store else []),
        broker_spec(settings), warehouse_spec(settings), worker_spec(settings),
        *([inference_spec(settings)] if settings.ai.enabled else []),
        *([delivery_spec(settings)] if settings.results.enabled and settings.results.destinations_file else []),
        *gateway_specs(settings),
    ]


def run_up(settings: Settings, specs: Sequence[ChildSpec] | None = None) -> int:
    """Entry point of ``radstream up``; returns the process exit code."""
    return Supervisor(settings, default_specs(settings) if specs is None else specs).run()

