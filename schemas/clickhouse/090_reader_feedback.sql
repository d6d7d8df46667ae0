-- The reading loop: every reader action the worklist applied (reading.applied), in the order
-- readers took them: claims, opens, each AI finding accepted / rejected / modified, releases,
-- signatures. AI monitoring (agreement, false-positive burden, discrepancies) reads the
-- decisions here. A replayed action has the same feedback_id and collapses into one row.
CREATE TABLE IF NOT EXISTS reader_feedback
(
    feedback_id  String,
    at           DateTime64(3, 'UTC'),
    trace_id     String,
    study_uid    String,
    version      UInt32,
    reader_id    LowCardinality(String),
    action       LowCardinality(String) COMMENT 'CLAIM, OPEN, ACCEPT, REJECT, MODIFY, RELEASE, SIGN',
    source_site  LowCardinality(String),
    finding      Nullable(String) COMMENT 'ACCEPT/REJECT/MODIFY: the AI finding label',
    model        Nullable(String) COMMENT 'name and version of the model that made the finding',
    score        Nullable(Float64),
    modified_to  Nullable(String),
    comment      Nullable(String),
    report_text  Nullable(String)
)
ENGINE = ReplacingMergeTree(at)
ORDER BY (study_uid, feedback_id)
