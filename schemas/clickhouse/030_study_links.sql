-- Identified zone: which de-identified study (what engines and analytics see) is which
-- original study (what the worklist shows). AI results keyed by the de-identified UID
-- join back to the worklist through this table; de-identified topics never carry it.
CREATE TABLE IF NOT EXISTS study_links
(
    study_uid         String,
    version           UInt32,
    deid_study_uid    String,
    trace_id          String,
    deid_trace_id     String,
    patient_pseudonym String,
    source_site       LowCardinality(String),
    linked_at         DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(linked_at)
ORDER BY (study_uid, version)
