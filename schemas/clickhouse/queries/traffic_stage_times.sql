-- When each stage first started and first finished for the studies a synthetic traffic run sent
-- (radstream load generate); the run's per-stage latencies are computed from these rows.
-- The AI pre-read is read from inference_results through study_links at query time, not from
-- stage_times: its inferred_at is on the study's shifted clock (whole days: the time of day is
-- kept, so no real time reaches the de-identified zone), so its real start is the link's
-- linked_at (written when de-identification ends) and its real end that plus the stage's own
-- latency_ms. The wait between de-identification and the AI stage taking the study is not
-- recorded anywhere and is not in these figures.
SELECT study_uid, stage, min(first_started_at) AS started_at, min(first_finished_at) AS finished_at
FROM stage_times
WHERE study_uid IN {study_uids:Array(String)} AND stage != 'ai'
GROUP BY study_uid, stage
UNION ALL
SELECT l.study_uid AS study_uid, 'ai' AS stage, min(l.linked_at) AS started_at,
       min(l.linked_at + toIntervalMillisecond(toInt64(r.latency_ms))) AS finished_at
FROM inference_results AS r
INNER JOIN (SELECT study_uid, version, deid_study_uid, linked_at FROM study_links
            WHERE study_uid IN {study_uids:Array(String)}) AS l
    ON l.deid_study_uid = r.study_uid AND l.version = r.version
GROUP BY l.study_uid
