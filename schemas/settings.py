"""One typed settings object for every radstream process.

Over 400 lines: one section per component's settings, kept together so every key is in one place.

Values come, highest priority first, from keyword arguments, ``RADSTREAM_*``
environment variables (``RADSTREAM_KAFKA_BOOTSTRAP`` sets ``kafka.bootstrap``),
an optional TOML file (``[kafka] bootstrap = "..."``) and the defaults below.
Validation happens once, at start: a bad value fails with :class:`SettingsError`
naming the key, the environment variable and the offending value, so a person can
fix it without reading a traceback. The supervisor hands the effective settings to
its children as environment variables (:meth:`Settings.to_env`), so every process
of one runtime sees the same configuration.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "RADSTREAM_"
_toml_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar("radstream_toml", default=None)


class SettingsError(ValueError):
    """Raised when configuration is invalid; the message names every bad key."""


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class KafkaSettings(_Group):
    """Broker connection. ``bootstrap`` unset means: start the embedded Tansu broker."""

    bootstrap: str | None = Field(None, description="host:port[,host:port] of a real Kafka cluster")
    embedded_port: int = Field(9092, ge=1, le=65535)
    storage: str = Field(
        "s3://tansu/",
        pattern=r"^(memory|s3)://[A-Za-z0-9._-]+/?$",
        description="embedded broker's storage: s3://BUCKET/ on the object store (durable) or memory:// (lost on restart)",
    )
    topic_prefix: str = Field("radstream", pattern=r"^[A-Za-z0-9._-]+$")
    partitions: int = Field(
        1, ge=1, le=1024,
        description="partitions of each topic radstream creates (as Kafka's own num.partitions default): the most "
                    "workers one stage can spread over. The embedded runtime runs one worker per stage, and on "
                    "Tansu's object-store engine every partition a consumer waits on costs object-store reads "
                    "(measured 2026-12-07, idle runtime: 4 partitions 34 conditional GETs/s and 0.11 of a core in "
                    "the broker, 1 partition 8.5/s and 0.05). Set it for a cluster (docker/: 12); it can grow later "
                    "but study keys then move to other partitions, so choose it before the first study",
    )
    replication_factor: int = Field(1, ge=1)
    session_timeout_s: float = Field(
        6.0, gt=0, description="consumer session timeout; Tansu's group join takes about half of it"
    )
    heartbeat_interval_s: float = Field(1.0, gt=0)
    produce_timeout_s: float = Field(10.0, gt=0, description="how long a gateway waits for a broker ack")
    group_commit_ms: float = Field(
        15.0, ge=0, le=1000,
        description="a gateway publish made while another waits for its ack lingers this long, so concurrent "
                    "senders' events share one produce request; a publish made alone is sent at once. On Tansu's "
                    "object-store engine every produce request costs object-store writes, and each consumer a "
                    "read (measured 2026-12-07, 4 associations: object store 13.6 -> 9.9 CPU ms per instance, means). "
                    "0 turns it off: on a Kafka cluster a produce request is cheap",
    )
    schema_registry_url: str | None = Field(
        None, description="Confluent schema registry; unset means Avro single-object encoding"
    )
    client_id: str = "radstream"
    producer_idempotence: bool = Field(
        False,
        description="librdkafka's idempotent producer (enable.idempotence) for gateways, replay and delivery. Off "
                    "by default: every publish waits for its own ack, so nothing it would reorder is in flight "
                    "together, and consumers drop duplicates by key; on Tansu each idempotent produce also "
                    "rewrites the cluster's one metadata object (measured: 4.67 -> 2.90 object-store PUTs per "
                    "instance). Turn it on for a Kafka cluster if you like: there it is cheap",
    )
    verify_end_offsets: bool = Field(
        True, description="read the last batch to find exact changelog ends (Tansu misreports them)"
    )
    fetch_max_wait_ms: int = Field(
        250, ge=1, le=5000,
        description="longest a stream worker's fetch waits for records; Tansu may hold a fetch that long even when "
                    "records arrive, so it bounds every stream hop. bench_e2e (2026-12-07): at Faust's 1500 ms "
                    "each hop took ~0.8 s (announced p99 1.42 s, quiet period p99 7.07 s); at 250 ms 0.16 s "
                    "(0.27 s, 5.42 s) with the same sustained throughput; at 50 ms the idle fetches' object-store "
                    "reads cut the sustained throughput by a quarter",
    )


class WarehouseSettings(_Group):
    """ClickHouse. ``url`` unset means: start the embedded chDB-backed endpoint."""

    url: str | None = Field(None, description="http(s)://host:port of a ClickHouse server")
    embedded_port: int = Field(8123, ge=1, le=65535)
    database: str = Field("radstream", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    username: str = "default"
    password: SecretStr = SecretStr("")
    connect_timeout_s: float = Field(10.0, gt=0)


class DicomSettings(_Group):
    """DICOM C-STORE/C-ECHO SCP (PS3.4 Annex B, PS3.7)."""

    ae_title: str = Field("RADSTREAM", min_length=1, max_length=16)
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(16, ge=1)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(30.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    artim_timeout_s: float = Field(
        5.0, gt=0, description="ARTIM (PS3.8 9.1.5): a connection whose A-ASSOCIATE-RQ has not come within this "
                               "is closed, freeing its association slot")
    max_unassociated_per_peer: int = Field(
        4, ge=1, description="connections one peer address may hold open before their A-ASSOCIATE-RQ; "
                             "more are closed at accept")
    # Site identity and access (issue 3): a comma-separated string so that it travels
    # unchanged through RADSTREAM_DICOM_SITE_MAP to the gateway process.
    site_map: str = Field(
        "", description="CALLING_AE=SITE,...: calling AE title -> source_site (unmapped: the AE title itself)"
    )
    allow_unknown_ae: bool = Field(
        True, description="accept calling AE titles missing from site_map; false: A-ASSOCIATE-RJ reason 3 (PS3.8 9.3.4)"
    )
    require_called_ae: bool = Field(False, description="reject associations not addressed to ae_title (reason 7)")
    tls_cert: Path | None = Field(None, description="PEM certificate (chain): the SCP speaks DICOM over TLS (PS3.15 B.1)")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    tls_ca: Path | None = Field(None, description="PEM CA bundle: senders must present a certificate it signed")

    @field_validator("ae_title")
    @classmethod
    def _ae_title_chars(cls, value: str) -> str:
        # PS3.5 6.2: AE VR is up to 16 chars, no backslash or control characters.
        if "\\" in value or any(ord(c) < 0x20 for c in value) or not value.strip():
            raise ValueError("AE title must be 1-16 printable characters without backslash")
        return value.strip()

    @field_validator("site_map")
    @classmethod
    def _site_map_pairs(cls, value: str) -> str:
        for pair in filter(None, (p.strip() for p in value.split(","))):
            ae, sep, site = (part.strip() for part in pair.partition("="))
            if not sep or not site or not ae or len(ae) > 16 or "\\" in ae:
                raise ValueError(f"must be AE_TITLE=SITE pairs (AE title 1-16 characters) separated by commas "
                                 f"(bad pair {pair!r})")
        return value

    @field_validator("allow_unknown_ae")
    @classmethod
    def _allow_list_not_empty(cls, value: bool, info: Any) -> bool:
        if not value and not _pairs_of(info.data.get("site_map") or ""):
            raise ValueError("false would refuse every sender: list the allowed AE titles in dicom.site_map")
        return value

    @field_validator("tls_key", "tls_ca")
    @classmethod
    def _tls_needs_cert(cls, value: Path | None, info: Any) -> Path | None:
        if value is not None and info.data.get("tls_cert") is None:
            raise ValueError(f"{info.field_name} is set but dicom.tls_cert is not")
        return value

    def sites(self) -> dict[str, str]:
        """Calling AE title (exact, padding stripped) -> site name."""
        pairs = (p.partition("=") for p in self.site_map.split(",") if "=" in p)
        return {ae.strip(): site.strip() for ae, _, site in pairs}


class Hl7Settings(_Group):
    """HL7 v2 MLLP listener for orders (ORM^O01) and patient updates (ADT); HL7 v2.5 Appendix C (MLLP).

    ``message_types`` and ``site_map`` are comma-separated strings so that they travel
    unchanged through ``RADSTREAM_HL7_*`` variables to the gateway process.
    """

    port: int = Field(2575, ge=1, le=65535)
    max_message_bytes: int = Field(1024 * 1024, ge=1024, description="larger MLLP frames are refused (AR)")
    message_types: str = Field(
        "ORM^O01,ADT^A01,ADT^A04,ADT^A05,ADT^A08,ADT^A31",
        description="MSH-9 type^event values accepted; others are answered AR (HL7 table 0076/0003)",
    )
    site_map: str = Field(
        "", description="FACILITY=SITE,...: MSH-4 sending facility -> source_site (unmapped: the facility itself)"
    )
    site_states: str = Field(
        "", description="SITE=ST,...: the state each site scans in (reader licensure); else PID-11 state"
    )
    idle_timeout_s: float = Field(300.0, gt=0, description="close an MLLP connection silent for this long")

    @field_validator("message_types")
    @classmethod
    def _message_types(cls, value: str) -> str:
        types = [t.strip().upper() for t in value.split(",") if t.strip()]
        bad = [t for t in types if not re.fullmatch(r"[A-Z0-9]{3}\^[A-Z0-9]{3}", t)]
        if not types or bad:
            raise ValueError(f"must be comma-separated TYPE^EVENT values such as ORM^O01 (bad: {bad or value!r})")
        return ",".join(types)

    @field_validator("site_map", "site_states")
    @classmethod
    def _pairs(cls, value: str) -> str:
        for pair in filter(None, (p.strip() for p in value.split(","))):
            key, sep, mapped = pair.partition("=")
            if not sep or not key.strip() or not mapped.strip():
                raise ValueError(f"must be KEY=VALUE pairs separated by commas (bad pair {pair!r})")
        return value

    def accepted_types(self) -> frozenset[str]:
        return frozenset(self.message_types.split(","))

    def site_for(self, facility: str) -> str:
        return _pairs_of(self.site_map).get(facility.upper(), facility)

    def state_for(self, site: str) -> str | None:
        return _pairs_of(self.site_states).get(site.upper())


def _pairs_of(value: str) -> dict[str, str]:
    pairs = (p.partition("=") for p in value.split(",") if "=" in p)
    return {key.strip().upper(): mapped.strip() for key, _, mapped in pairs}


class StowSettings(_Group):
    """DICOMweb STOW-RS endpoint (PS3.18 10.5): HTTPS when both ``tls_cert`` and ``tls_key`` are set.

    ``tokens`` (``TOKEN=SITE,...``) and ``tokens_file`` (TOML ``[tokens] "TOKEN" = "SITE"``)
    map bearer tokens to the source site; with neither, every request is refused (401).
    """

    port: int = Field(8080, ge=1, le=65535)
    tls_cert: Path | None = Field(None, description="PEM certificate (chain) for HTTPS")
    tls_key: Path | None = Field(None, description="PEM private key for HTTPS")
    tokens: SecretStr = Field(SecretStr(""), description="TOKEN=SITE,...: bearer token -> source_site")
    tokens_file: Path | None = Field(None, description='TOML file with [tokens] "TOKEN" = "SITE"')
    max_part_bytes: int = Field(512 * 1024 * 1024, ge=1024, description="larger instances are refused (0xA700)")
    max_body_bytes: int = Field(16 * 1024 * 1024 * 1024, ge=1024, description="larger requests are refused (413)")
    parts_in_flight: int = Field(8, ge=1, description="instances of one request stored concurrently")
    retry_after_s: int = Field(10, ge=1, description="Retry-After of a 503 while the broker is unreachable")

    @field_validator("tokens")
    @classmethod
    def _token_pairs(cls, value: SecretStr) -> SecretStr:
        for pair in filter(None, (p.strip() for p in value.get_secret_value().split(","))):
            token, sep, site = pair.partition("=")
            if not sep or not token.strip() or not site.strip():
                raise ValueError("must be TOKEN=SITE pairs separated by commas")
        return value


class ReadingSettings(_Group):
    """The reading API (readers claim, open, decide AI findings and sign; admins and analysts
    read the worklist): JSON over HTTP, HTTPS when both ``tls_cert`` and ``tls_key`` are set.

    ``users_file`` (TOML, ``[[user]]`` with ``id``, ``role`` reader/admin/analyst, ``sites``
    and ``token_sha256``; ``radstream users token`` makes a token and its hash) says who may
    do what; with none, every request is refused (401).
    """

    port: int = Field(8090, ge=1, le=65535)
    users_file: Path | None = Field(None, description="TOML [[user]] file: id, role, sites, token_sha256")
    tls_cert: Path | None = Field(None, description="PEM certificate (chain) for HTTPS")
    tls_key: Path | None = Field(None, description="PEM private key for HTTPS")
    max_body_bytes: int = Field(256 * 1024, ge=1024, description="larger requests are refused (413)")


class ResultsSettings(_Group):
    """Results out: every revision of a study's result goes to the destinations of its site.

    ``destinations_file`` (TOML, one ``[destinations.NAME]`` table each with ``kind``
    sr/oru/fhir/webhook, ``sites`` and the protocol's address) says where; with none, results
    are kept (outbox topic, warehouse) and sent nowhere. A failed send is retried with
    exponential backoff and jitter up to ``max_attempts``, then dead-lettered; a destination
    that keeps failing is taken out by its circuit breaker for ``breaker_reset_s``.
    """

    enabled: bool = Field(True, description="build results from AI results and reader actions")
    destinations_file: Path | None = Field(None, description="TOML [destinations.NAME] file: kind, sites, address")
    max_attempts: int = Field(6, ge=1, le=100)
    backoff_s: float = Field(1.0, gt=0, description="first retry delay; doubles each attempt, with full jitter")
    max_backoff_s: float = Field(60.0, gt=0)
    breaker_failures: int = Field(5, ge=1, description="consecutive failures that open a destination's circuit")
    breaker_reset_s: float = Field(30.0, gt=0)
    timeout_s: float = Field(15.0, gt=0, description="one attempt's network timeout")
    alert_ack_s: int = Field(600, ge=10, description="a critical alert unacknowledged this long escalates")
    alert_escalate_to: str = Field(
        "the on-call supervisor,the department chief,the medical director",
        description="whom each escalation of an unacknowledged alert calls on, in order, comma-separated: "
                    "an alert escalates as many times as there are names")
    alert_scan_interval_s: float = Field(5.0, gt=0, description="how often open alerts are checked against "
                                                                "their acknowledgement deadline")

    @field_validator("alert_escalate_to")
    @classmethod
    def _escalation_chain(cls, value: str) -> str:
        if not [name for name in value.split(",") if name.strip()]:
            raise ValueError("must name whom an unacknowledged alert escalates to, e.g. 'the on-call supervisor'")
        return value

    def escalation_chain(self) -> tuple[str, ...]:
        """Whom escalation level 1, 2, ... calls on; its length is the highest level."""
        return tuple(name.strip() for name in self.alert_escalate_to.split(",") if name.strip())


class BlobSettings(_Group):
    """Claim-check store for instance bytes; pixel data never rides on Kafka.

    S3 everywhere: the embedded SeaweedFS, or S3/MinIO/Ceph in production
    (``s3_endpoint``). ``backend = "local"`` (a directory) is for unit tests only.
    """

    backend: Literal["s3", "local"] = "s3"
    root: Path | None = Field(None, description="local backend's directory; default DATA_DIR/blobs")
    bucket: str = Field("radstream", pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    s3_endpoint: str | None = Field(None, description="http(s)://host:port of an S3 service; unset: embedded SeaweedFS")
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = Field(None, description="unset with the embedded store: generated on first start")
    s3_secret_access_key: SecretStr | None = None
    s3_verify_tls: bool = True
    s3_ca_bundle: Path | None = None
    s3_timeout_s: float = Field(10.0, gt=0)
    encryption_key: SecretStr | None = Field(
        None, description="base64 of 32 bytes: blobs are encrypted with AES-256-GCM before they leave the process"
    )
    compression: Literal["lz4", "none"] = Field(
        "lz4",
        description="S3 blobs are stored LZ4-framed (marked in the object's metadata) where that saves a tenth or "
                    "more, instances with native 16-bit pixel data byte-shuffled first: a 526 kB CT slice is "
                    "stored in 214 kB, at ~1 ms of CPU, and the object store's work per PUT grows with the bytes; "
                    "radstream's readers undo it. 'none' stores instances as sent",
    )


class SeaweedSettings(_Group):
    """The embedded object store (SeaweedFS ``weed mini``), bound to ``bind_host``.

    Besides S3 it opens master, volume, filer and admin ports and their gRPC ports:
    ``port_base`` .. ``port_base + 7`` and ``port_base + 10007`` (the admin server's gRPC
    port, where SeaweedFS's own workers look for it; ``radstream.objectstore.PORT_OFFSETS``),
    so that two runtimes on one machine never collide.
    """

    s3_port: int = Field(8333, ge=1, le=65535)
    port_base: int = Field(18300, ge=1, le=65535 - 10007)
    volume_size_limit_mb: int = Field(256, ge=8)


class AssemblySettings(_Group):
    quiet_period_s: float = Field(5.0, gt=0, description="a study with no new instance for this long is complete")
    scan_interval_s: float = Field(0.5, gt=0, description="how often open studies are checked against the clock")
    retention_h: float = Field(24.0, gt=0, description="how long assembled studies are kept for late instances")


class RoutingSettings(_Group):
    rules_file: Path | None = Field(None, description="TOML routing rules; default: the packaged rules")
    roster_file: Path | None = Field(
        None, description="TOML reader roster (streams/rules/roster.example.toml shows the format), re-read when it "
                          "changes; unset: studies are routed but not assigned to readers")
    assignment_tick_s: float = Field(
        30.0, gt=0, description="how often assignment re-checks aging, shift ends and unassigned studies")
    promote_within: float = Field(
        0.25, gt=0, le=1, description="a routine study with under this share of its SLA left is promoted to urgent")


class WorkerSettings(_Group):
    web_port: int = Field(6066, ge=1, le=65535, description="Faust web server port (0 disables)")
    sink_batch_size: int = Field(500, ge=1)
    sink_batch_window_s: float = Field(0.5, gt=0)
    transient_retries_s: tuple[Annotated[float, Field(ge=0)], ...] = Field(
        (0.5, 1.0, 2.0, 4.0, 8.0), max_length=20,
        description="a blocking stage (de-identification) whose object store could not be reached tries the "
                    "study again after each of these delays, holding its partition, and dead-letters it only "
                    "then: a store restarting (the supervisor's restart of the embedded one takes a few seconds) "
                    "loses no study to the dead-letter topic; () dead-letters at once",
    )


class MetricsSettings(_Group):
    """Prometheus exposition ports, one per process kind; 0 disables."""

    gateway_port: int = Field(9464, ge=0, le=65535)
    hl7_gateway_port: int = Field(9466, ge=0, le=65535)
    stow_gateway_port: int = Field(9467, ge=0, le=65535)
    worker_port: int = Field(9465, ge=0, le=65535)
    inference_port: int = Field(9468, ge=0, le=65535)
    reading_port: int = Field(9469, ge=0, le=65535)


class DeidSettings(_Group):
    """De-identification (PS3.15 Annex E): the secret behind UIDs/pseudonyms and the site policy."""

    key: SecretStr | None = Field(None, description="hex secret (>= 32 bytes); unset: read key_file")
    key_file: Path | None = Field(None, description="secret key file; default DATA_DIR/secrets/deid.key, created 0600")
    policy_file: Path | None = Field(None, description="TOML per-site policy; default: the packaged policy")


class PriorsSettings(_Group):
    """Prior comparison (de-identified zone): which of a patient's earlier studies are compared."""

    look_back_days: int = Field(3650, ge=1, description="priors older than this (shifted dates) are not compared")
    max_priors: int = Field(3, ge=1, description="the last N relevant priors within the window are compared")
    score_change_min: float = Field(0.1, gt=0, le=1, description="a model score moving this much is a score change")
    regions_file: Path | None = Field(None, description="extra body-region rows (schemas/priors/body_regions.csv columns)")
    adjacency_file: Path | None = Field(None, description="extra adjacent-region rows (region_adjacency.csv columns)")


class RolloutRule(_Group):
    """How one model runs at one site: ``active`` (findings route), ``silent`` (recorded and
    analysed, never used for routing) or ``off``; ``fraction`` < 1 is a canary: that share of
    studies (chosen by study, stable across versions) runs active, the rest silent."""

    model: str = Field("*", description="model card name, or * for every model")
    site: str = Field("*", description="source site name (or its de-identified pseudonym), or * for every site")
    mode: Literal["active", "silent", "off"] = "active"
    fraction: float = Field(1.0, ge=0, le=1, description="canary: share of studies run active")


class AiSettings(_Group):
    """The AI pre-read stage (``python -m streams inference``): engines, batching, admission, safety."""

    enabled: bool = Field(True, description="run the AI stage; off: worklist rows carry ai_status NONE")
    models_dir: Path | None = Field(None, description="directory of model cards (*/card.yaml); default: the shipped demo models")
    backend: Literal["auto", "tensorrt", "onnxruntime-cuda", "onnxruntime-cpu"] = Field(
        "auto", description="inference backend; auto: the first that works here (TensorRT, ORT CUDA, ORT CPU)")
    plan_cache_dir: Path | None = Field(None, description="TensorRT plan cache; default DATA_DIR/trt-plans")
    engine_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0: its default")
    latency_budget_s: float = Field(10.0, gt=0, description="a study not pre-read this long after the stage took it is TIMEOUT")
    max_batch_images: int = Field(32, ge=1, description="a batch closes at this many images ...")
    max_batch_delay_ms: float = Field(10.0, ge=0, description="... or this long after its first image")
    queue_studies: int = Field(64, ge=1, description="studies admitted at once; routine ones beyond are deferred")
    max_routine_wait_s: float = Field(5.0, gt=0, description="a routine study queued this long is promoted (no starvation)")
    retry_delay_s: float = Field(2.0, ge=0, description="a deferred study is read again from inference.retry after this long")
    decode_workers: int = Field(0, ge=0, description="processes decoding pixel data; 0: one per CPU")
    breaker_failures: int = Field(3, ge=1, description="consecutive engine failures that open a model's circuit")
    breaker_reset_s: float = Field(30.0, gt=0, description="an open circuit is tried again after this long")
    emergency_locations: str = Field(
        r"^(ED|ER|EC|EMERG|EMERGENCY|TRAUMA)\b",
        description="regex (case-insensitive) over the order's patient location (PV1-3) that marks an emergency")
    rollout: list[RolloutRule] = Field(default_factory=list, description="[[ai.rollout]] rules; the last match wins")

    @field_validator("emergency_locations")
    @classmethod
    def _valid_regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


class RuntimeSettings(_Group):
    """How ``radstream up`` supervises its children."""

    stop_grace_s: float = Field(5.0, ge=0, description="SIGTERM, then SIGKILL after this long")
    ready_timeout_s: float = Field(90.0, gt=0)
    log_max_mb: float = Field(
        64.0, gt=0,
        description="a child's log (DATA_DIR/logs/<child>.log) over this size is copied to <child>.log.1 and "
                    "emptied in place, the child appending on (copy-truncate: lines written during the copy may "
                    "be lost); the gateways log a line per instance, so without it the logs grew without bound",
    )
    log_keep: int = Field(3, ge=0, le=100, description="copies kept of each child's log (.1 the newest)")


_GROUPS: dict[str, type[_Group]] = {
    "kafka": KafkaSettings,
    "warehouse": WarehouseSettings,
    "dicom": DicomSettings,
    "hl7": Hl7Settings,
    "stow": StowSettings,
    "reading": ReadingSettings,
    "blobs": BlobSettings,
    "seaweedfs": SeaweedSettings,
    "assembly": AssemblySettings,
    "routing": RoutingSettings,
    "worker": WorkerSettings,
    "metrics": MetricsSettings,
    "runtime": RuntimeSettings,
    "deid": DeidSettings,
    "ai": AiSettings,
    "priors": PriorsSettings,
    "results": ResultsSettings,
}


class _TomlSource(PydanticBaseSettingsSource):
    """Reads the optional TOML file named by ``--config`` / ``RADSTREAM_CONFIG``."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        if path is not None:
            try:
                with open(path, "rb") as fh:
                    self._data = tomllib.load(fh)
            except FileNotFoundError:
                raise SettingsError(f"config file {path} does not exist") from None
            except tomllib.TOMLDecodeError as exc:
                raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class Settings(BaseSettings):
    """All configuration of one radstream runtime."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="forbid",
        validate_assignment=True,
    )

    data_dir: Path = Field(Path("data"), description="where embedded components keep their state")
    bind_host: str = Field("127.0.0.1", description="address every listener binds to")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["console", "json"] = "console"

    kafka: KafkaSettings = KafkaSettings()
    warehouse: WarehouseSettings = WarehouseSettings()
    dicom: DicomSettings = DicomSettings()
    hl7: Hl7Settings = Hl7Settings()
    stow: StowSettings = StowSettings()
    reading: ReadingSettings = ReadingSettings()
    blobs: BlobSettings = BlobSettings()
    seaweedfs: SeaweedSettings = SeaweedSettings()
    assembly: AssemblySettings = AssemblySettings()
    routing: RoutingSettings = RoutingSettings()
    worker: WorkerSettings = WorkerSettings()
    metrics: MetricsSettings = MetricsSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    deid: DeidSettings = DeidSettings()
    ai: AiSettings = AiSettings()
    priors: PriorsSettings = PriorsSettings()
    results: ResultsSettings = ResultsSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls, _toml_path.get()))

    # -- derived values: one place, so no module recomputes them differently --

    @property
    def embedded_kafka(self) -> bool:
        return self.kafka.bootstrap is None

    @property
    def kafka_bootstrap(self) -> str:
        return self.kafka.bootstrap or f"{self.bind_host}:{self.kafka.embedded_port}"

    @property
    def embedded_warehouse(self) -> bool:
        return self.warehouse.url is None

    @property
    def warehouse_url(self) -> str:
        return self.warehouse.url or f"http://{self.bind_host}:{self.warehouse.embedded_port}"

    @property
    def embedded_objectstore(self) -> bool:
        return self.blobs.backend == "s3" and self.blobs.s3_endpoint is None

    @property
    def s3_endpoint(self) -> str:
        return self.blobs.s3_endpoint or f"http://{self.bind_host}:{self.seaweedfs.s3_port}"

    @property
    def blob_root(self) -> Path:
        return (self.blobs.root or self.data_dir / "blobs").resolve()

    def topic(self, suffix: str) -> str:
        return f"{self.kafka.topic_prefix}.{suffix}"

    def to_env(self) -> dict[str, str]:
        """Flatten to ``RADSTREAM_*`` variables that reproduce these settings in a child."""
        env: dict[str, str] = {}
        for name, value in self.model_dump(mode="json").items():
            if name in _GROUPS:
                for key, sub in value.items():
                    if sub is not None:
                        raw = getattr(getattr(self, name), key)
                        if isinstance(raw, SecretStr):
                            sub = raw.get_secret_value()
                        elif isinstance(sub, (list, dict)):
                            sub = json.dumps(sub)  # pydantic-settings parses complex values as JSON
                        env[f"{ENV_PREFIX}{name.upper()}_{key.upper()}"] = str(sub)
            elif value is not None:
                env[f"{ENV_PREFIX}{name.upper()}"] = str(value)
        return env


def load_settings(config: Path | str | None = None, **overrides: Any) -> Settings:
    """Build and validate settings; raise :class:`SettingsError` with readable messages.

    ``config`` defaults to ``$RADSTREAM_CONFIG`` when that is set.
    """
    path = Path(config) if config else (Path(os.environ["RADSTREAM_CONFIG"]) if os.environ.get("RADSTREAM_CONFIG") else None)
    token = _toml_path.set(path)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(_explain(exc, path)) from None
    finally:
        _toml_path.reset(token)


def _explain(exc: ValidationError, path: Path | None) -> str:
    lines = ["invalid radstream settings:"]
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc)
        env = ENV_PREFIX + "_".join(part.upper() for part in loc)
        where = f"env {env}"
        if path is not None:
            where += f" or [{loc[0]}] {'.'.join(loc[1:])} in {path}" if len(loc) > 1 else f" or {key} in {path}"
        if err["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown setting (from {where})")
        else:
            lines.append(f"  - {key}: {err['msg']} (got {err.get('input')!r}; set by {where})")
    return "\n".join(lines)
