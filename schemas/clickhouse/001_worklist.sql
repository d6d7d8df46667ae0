-- Current worklist: one row per study, the latest version wins.
-- ReplacingMergeTree keyed by study: re-delivered worklist updates (sink retries, replays)
-- collapse into one row; read it with FINAL (or argMax) to see only the latest.
CREATE TABLE IF NOT EXISTS worklist
(
    study_uid         String,
    version           UInt32,
    trace_id          String,
    accession_number  Nullable(String),
    patient_id        Nullable(String),
    patient_name      Nullable(String),
    modality          LowCardinality(String),
    modalities        Array(String),
    body_part         Nullable(String),
    study_description Nullable(String),
    priority          LowCardinality(String),
    subspecialty      LowCardinality(String),
    source_site       LowCardinality(String),
    institution_name  Nullable(String),
    instance_count    UInt32,
    status            LowCardinality(String),
    reasons           Array(String),
    received_at       DateTime64(3, 'UTC'),
    assembled_at      DateTime64(3, 'UTC'),
    routed_at         DateTime64(3, 'UTC'),
    row_version       UInt64 COMMENT 'version * 2^42 + routed_at in ms: later versions, then later updates, win'
)
ENGINE = ReplacingMergeTree(row_version)
ORDER BY study_uid
