-- The audit trail: who did what to which study, when, with the trace_id that links it to the
-- study's other events. Assignment decisions carry their full explanation (filters, each
-- candidate's score terms) in detail['explanation'] as JSON. Append-only: never replaced.
CREATE TABLE IF NOT EXISTS audit
(
    at        DateTime64(3, 'UTC'),
    trace_id  String,
    study_uid Nullable(String),
    actor     LowCardinality(String),
    action    LowCardinality(String),
    stage     LowCardinality(String),
    detail    Map(String, String)
)
ENGINE = MergeTree
ORDER BY (at, trace_id)
