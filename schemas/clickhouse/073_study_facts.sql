-- One row of aggregate states per study, from every worklist row as it is inserted (074): the
-- latest attributes (argMax by row_version: later versions and later updates win, as in the
-- worklist), the first receipt and routing, the first time the study was seen SIGNED and its
-- latest SLA deadline. The analytics group and judge studies by it without FINAL.
-- Duplicates: argMax, min and minIf give the same answer however often a row is re-delivered.
-- Nullable arguments: argMax skips NULLs, so a deadline once set stays until another replaces it.
CREATE TABLE IF NOT EXISTS study_facts
(
    study_uid       String,
    priority        AggregateFunction(argMax, String, UInt64),
    source_site     AggregateFunction(argMax, String, UInt64),
    modality        AggregateFunction(argMax, String, UInt64),
    subspecialty    AggregateFunction(argMax, String, UInt64),
    reader          AggregateFunction(argMax, String, UInt64) COMMENT 'assigned reader, empty: unassigned',
    status          AggregateFunction(argMax, String, UInt64),
    sla_deadline    AggregateFunction(argMax, Nullable(DateTime64(3, 'UTC')), UInt64),
    received_at     SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    first_routed_at SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    signed_at       AggregateFunction(minIf, Nullable(DateTime64(3, 'UTC')), UInt8)
)
ENGINE = AggregatingMergeTree
ORDER BY study_uid
