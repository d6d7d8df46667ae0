-- Backfill, once: stage_times is fed by 072's materialized view from the rows inserted after it
-- was created; a warehouse that had inference_results rows before gets them here, at the first start
-- that finds stage_times without them. Safe to repeat: its states ignore duplicates.
INSERT INTO stage_times
SELECT l.study_uid AS study_uid, 'ai' AS stage,
       min(r.inferred_at - toIntervalMillisecond(toInt64(r.latency_ms))) AS first_started_at,
       min(r.inferred_at) AS first_finished_at, max(r.inferred_at) AS last_finished_at,
       max(l.version) AS versions
FROM inference_results AS r
INNER JOIN (SELECT study_uid, version, deid_study_uid FROM study_links) AS l
    ON l.deid_study_uid = r.study_uid AND l.version = r.version
WHERE (SELECT count() FROM stage_times WHERE stage = 'ai') = 0
GROUP BY l.study_uid
