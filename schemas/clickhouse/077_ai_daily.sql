-- AI monitoring per day, model, model version, backend, site and label (078): the runs and
-- their status, the runs flagging the label, and every run's score and latency.
-- Duplicates: a run is (de-identified study_uid, version); counts are uniqExact over runs and
-- scores/latencies are kept as sets of (study_uid, version, value), so a re-delivered row adds
-- nothing. quantileExact would keep every value too; keyed by run they also deduplicate.
-- A run that really ran twice (a retry with another result) counts as two values.
-- site: the original site through study_links; a run is counted once its link is in (078, 116).
-- Cost: the join reads study_links (ordered by study_uid, not deid_study_uid) at each insert;
-- where that grows too large, a dictionary keyed by deid_study_uid should serve it instead.
CREATE TABLE IF NOT EXISTS ai_daily
(
    day             Date,
    model           LowCardinality(String),
    model_version   LowCardinality(String),
    backend         LowCardinality(String),
    site            LowCardinality(String),
    label           LowCardinality(String) COMMENT 'empty: a run with no scores (error, timeout)',
    runs            AggregateFunction(uniqExact, String, UInt32),
    ok_runs         AggregateFunction(uniqExactIf, String, UInt32, UInt8),
    silent_runs     AggregateFunction(uniqExactIf, String, UInt32, UInt8),
    flagged_runs    AggregateFunction(uniqExactIf, String, UInt32, UInt8),
    scores          AggregateFunction(groupUniqArrayIf, Tuple(String, UInt32, Float32), UInt8),
    latencies_ms    AggregateFunction(groupUniqArray, Tuple(String, UInt32, Float32))
)
ENGINE = AggregatingMergeTree
ORDER BY (day, model, model_version, backend, site, label)
