-- Backfill, once: stage_times is fed by 072's and 114's materialized views from the rows inserted
-- after they were created; a warehouse that had inference_results rows before gets them here, at
-- the first start that finds stage_times without them. Safe to repeat: its states ignore
-- duplicates. Times as in 072: the link's real time plus the stage's own latency.
INSERT INTO stage_times
SELECT l.study_uid AS study_uid, 'ai' AS stage,
       min(l.linked_at) AS first_started_at,
       min(l.linked_at + toIntervalMillisecond(toInt64(r.latency_ms))) AS first_finished_at,
       max(l.linked_at + toIntervalMillisecond(toInt64(r.latency_ms))) AS last_finished_at,
       max(l.version) AS versions
FROM inference_results AS r
INNER JOIN (SELECT study_uid, version, deid_study_uid, linked_at FROM study_links) AS l
    ON l.deid_study_uid = r.study_uid AND l.version = r.version
WHERE (SELECT count() FROM stage_times WHERE stage = 'ai') = 0
GROUP BY l.study_uid
