-- Backlog over time: every change of every worklist row (routing, assignment, aging, later a
-- reader's open and sign), as (when, whose list, which status). The depth of a reader's list
-- at time T is the number of studies whose latest change at or before T puts them on it open
-- (named query report_backlog). Re-delivered rows carry the same (study_uid, row_version):
-- they collapse at merge, and the report's argMax per study gives the same answer before that.
CREATE TABLE IF NOT EXISTS worklist_changes
(
    study_uid       String,
    row_version     UInt64,
    changed_at      DateTime64(3, 'UTC'),
    assigned_reader String COMMENT 'empty: not assigned',
    status          LowCardinality(String),
    priority        LowCardinality(String),
    source_site     LowCardinality(String),
    modality        LowCardinality(String),
    subspecialty    LowCardinality(String),
    sla_deadline    Nullable(DateTime64(3, 'UTC'))
)
ENGINE = ReplacingMergeTree
ORDER BY (study_uid, row_version)
