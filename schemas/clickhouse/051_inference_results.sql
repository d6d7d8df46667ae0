-- De-identified zone: one row per model run of every AI pre-read (inference.result), for
-- AI monitoring: scores and findings per model version and site pseudonym, backends,
-- latencies, silent and canary runs. Keyed by the de-identified study UID; the identified
-- worklist joins it only through study_links.
CREATE TABLE IF NOT EXISTS inference_results
(
    study_uid      String COMMENT 'de-identified study UID',
    version        UInt32,
    trace_id       String COMMENT 'de-identified trace id',
    status         LowCardinality(String) COMMENT 'the study result: OK, TIMEOUT, ERROR, NOT_APPLICABLE',
    model          LowCardinality(String),
    model_version  LowCardinality(String),
    model_sha256   String,
    backend        LowCardinality(String),
    model_status   LowCardinality(String),
    silent         Bool,
    images         UInt32,
    labels         Array(String),
    scores         Array(Float32),
    thresholds     Array(Float32),
    findings       Array(String) COMMENT 'labels at or above threshold',
    level          UInt8 COMMENT 'admission level: 1 urgent, 2 routine',
    queued_ms      Float32,
    decode_ms      Float32,
    infer_ms       Float32,
    latency_ms     Float32,
    reason         Nullable(String),
    inferred_at    DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(inferred_at)
ORDER BY (study_uid, version, model)
