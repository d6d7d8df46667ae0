-- Throughput per stage: per hour (UTC) in [since, now), the studies that finished each stage for
-- the first time (stage_times: the first finish over every version, so re-delivered rows and
-- later versions of a study do not count again). Stages in pipeline order.
WITH ['received', 'assembled', 'deidentified', 'routed', 'ai', 'opened', 'signed'] AS stage_order
SELECT toStartOfHour(finished_at) AS hour, stage, count() AS studies
FROM (
    SELECT study_uid, stage, min(first_finished_at) AS finished_at
    FROM stage_times
    GROUP BY study_uid, stage
)
WHERE finished_at >= {since:DateTime64(3, 'UTC')} AND finished_at < {now:DateTime64(3, 'UTC')}
GROUP BY hour, stage
ORDER BY hour, indexOf(stage_order, stage)
