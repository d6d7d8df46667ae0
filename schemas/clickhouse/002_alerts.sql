-- Critical alerts (critical AI findings, turnaround breaches), deduplicated per study version and type.
CREATE TABLE IF NOT EXISTS alerts
(
    study_uid    String,
    version      UInt32,
    trace_id     String,
    alert_type   LowCardinality(String),
    severity     LowCardinality(String),
    message      String,
    finding_code Nullable(String),
    raised_at    DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (study_uid, version, alert_type)
