-- AI agreement, incrementally: per study and AI finding (label), the reader's latest decision on
-- it (ACCEPT, REJECT, MODIFY) with everything that decision said, fed by 111 from reader_feedback.
-- A finding can be decided again while a reader holds the study (the worklist keeps the last word),
-- so the latest decision by (at, feedback_id) is the one the signed read carries.
-- decision: (action, model "name version", score as the reader saw it, modified_to, comment,
-- reader_id, source_site, study version), one tuple so that a NULL comment or modified_to of the
-- latest decision is kept (argMax over a Nullable column would skip it and show an older one).
-- Duplicates: a re-delivered reader_feedback row is the same (at, feedback_id) with the same
-- content, so argMax and max give the same answer however often it arrives.
CREATE TABLE IF NOT EXISTS ai_decisions
(
    study_uid  String,
    finding    String COMMENT 'the AI finding label',
    decision   AggregateFunction(argMax,
                   Tuple(String, String, Nullable(Float64), Nullable(String), Nullable(String), String, String, UInt32),
                   Tuple(DateTime64(3, 'UTC'), String)),
    decided_at SimpleAggregateFunction(max, DateTime64(3, 'UTC')) COMMENT 'when the latest decision was taken'
)
ENGINE = AggregatingMergeTree
ORDER BY (study_uid, finding)
