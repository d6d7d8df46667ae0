-- Each output of each result revision to each destination: its latest delivery state
-- (QUEUED, SENT, ACKED, FAILED, DEAD) with the attempts it took and the last error.
CREATE TABLE IF NOT EXISTS deliveries
(
    study_uid       String,
    revision        UInt32,
    destination     LowCardinality(String),
    trace_id        String,
    kind            LowCardinality(String) COMMENT 'sr, oru, fhir, webhook',
    status          LowCardinality(String),
    attempts        UInt32,
    at              DateTime64(3, 'UTC'),
    result_status   LowCardinality(String),
    document_id     Nullable(String) COMMENT 'SR SOP Instance UID, HL7 control id, FHIR id, webhook id',
    error           Nullable(String),
    next_attempt_at Nullable(DateTime64(3, 'UTC'))
)
ENGINE = ReplacingMergeTree(at)
ORDER BY (study_uid, revision, destination)
