-- One row per study version per pipeline stage, with the stage's timestamps (audit and turnaround).
CREATE TABLE IF NOT EXISTS stage_events
(
    study_uid    String,
    version      UInt32,
    stage        LowCardinality(String),
    trace_id     String,
    source_site  LowCardinality(String),
    started_at   DateTime64(3, 'UTC'),
    finished_at  DateTime64(3, 'UTC'),
    detail       Map(String, String),
    recorded_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(recorded_at)
ORDER BY (study_uid, version, stage)
