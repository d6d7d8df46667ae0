-- Who acknowledged a study's critical alert for a finding, when, and their note (alert.ack,
-- from the reading API). An acknowledgement of the finding on any version of the study closes
-- its alerts (queries/alerts.sql); a replayed acknowledgement collapses into its row.
CREATE TABLE IF NOT EXISTS alert_acks
(
    study_uid String,
    finding   String,
    at        DateTime64(3, 'UTC'),
    actor     LowCardinality(String),
    trace_id  String,
    version   UInt32,
    note      Nullable(String)
)
ENGINE = ReplacingMergeTree
ORDER BY (study_uid, finding, actor, at)
