-- Everything that could not be processed, with the reason, for operators: dead letters
-- and instances quarantined by de-identification (dlq_topic tells which).
CREATE TABLE IF NOT EXISTS dead_letters
(
    failed_at        DateTime64(3, 'UTC'),
    stage            LowCardinality(String),
    reason           LowCardinality(String),
    error            String,
    trace_id         Nullable(String),
    key              Nullable(String),
    source_topic     Nullable(String),
    source_partition Nullable(Int32),
    source_offset    Nullable(Int64),
    payload_uri      Nullable(String),
    dlq_topic        LowCardinality(String),
    dlq_partition    Int32,
    dlq_offset       Int64
)
ENGINE = ReplacingMergeTree
ORDER BY (dlq_topic, dlq_partition, dlq_offset)
