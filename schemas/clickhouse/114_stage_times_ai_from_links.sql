-- The 'ai' stage for runs whose link reached the warehouse after them: the sink writes links and
-- AI results from different topics, so either may come first (072 counts the run when its link
-- is already there; this, when the link arrives). Both write min/max states: counted once.
CREATE MATERIALIZED VIEW IF NOT EXISTS stage_times_ai_from_links TO stage_times AS
SELECT l.study_uid AS study_uid, 'ai' AS stage,
       min(l.linked_at) AS first_started_at,
       min(l.linked_at + toIntervalMillisecond(toInt64(r.latency_ms))) AS first_finished_at,
       max(l.linked_at + toIntervalMillisecond(toInt64(r.latency_ms))) AS last_finished_at,
       max(l.version) AS versions
FROM study_links AS l
INNER JOIN (SELECT study_uid, version, latency_ms FROM inference_results) AS r
    ON r.study_uid = l.deid_study_uid AND r.version = l.version
GROUP BY l.study_uid
