-- Results out: every revision of every study's result (results.outbox), the content each
-- output (SR, ORU, FHIR, webhook) was built from. A re-delivered revision collapses into one row.
CREATE TABLE IF NOT EXISTS results
(
    study_uid     String,
    revision      UInt32,
    trace_id      String,
    version       UInt32,
    status        LowCardinality(String) COMMENT 'PRELIMINARY, FINAL, CORRECTED',
    replaces      Nullable(UInt32) COMMENT 'the revision a CORRECTED result amends',
    issued_at     DateTime64(3, 'UTC'),
    source_site   LowCardinality(String),
    priority      LowCardinality(String),
    critical      Bool,
    findings      Array(String) COMMENT 'label decision (model version) confidence',
    changes       Array(String) COMMENT 'why this revision',
    report_text   String COMMENT 'the draft preliminary report, or the signed text once FINAL',
    reader_id     Nullable(String),
    signed_at     Nullable(DateTime64(3, 'UTC'))
)
ENGINE = ReplacingMergeTree(issued_at)
ORDER BY (study_uid, revision)
