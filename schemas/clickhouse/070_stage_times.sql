-- Stage latencies, incrementally: per study and stage, when the stage first started and first
-- and last finished, over every version of the study. Fed by materialized views over
-- stage_events (071) and inference_results (072); the reading loop's 'opened' and 'signed'
-- stage_events rows land here with no change. Re-delivered rows and later versions are
-- harmless: min and max are idempotent, so a duplicate never moves a figure.
CREATE TABLE IF NOT EXISTS stage_times
(
    study_uid          String,
    stage              LowCardinality(String),
    first_started_at   SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    first_finished_at  SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    last_finished_at   SimpleAggregateFunction(max, DateTime64(3, 'UTC')),
    versions           SimpleAggregateFunction(max, UInt32)
)
ENGINE = AggregatingMergeTree
ORDER BY (study_uid, stage)
