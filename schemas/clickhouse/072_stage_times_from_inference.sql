-- The AI pre-read as the stage 'ai' of the original study: inference_results is keyed by the
-- de-identified study UID, so each run is linked back through study_links at insert time (the
-- link is written when de-identification ends, before the pre-read starts). A run whose link
-- is not yet in the warehouse is not counted here (inner join); inference_results keeps it.
-- Duplicates: min/max states, see 070.
-- Cost: the join reads study_links (ordered by study_uid, not deid_study_uid) at each insert;
-- where that grows too large, a dictionary keyed by deid_study_uid should serve it instead.
CREATE MATERIALIZED VIEW IF NOT EXISTS stage_times_from_inference TO stage_times AS
SELECT l.study_uid AS study_uid, 'ai' AS stage,
       min(r.inferred_at - toIntervalMillisecond(toInt64(r.latency_ms))) AS first_started_at,
       min(r.inferred_at) AS first_finished_at, max(r.inferred_at) AS last_finished_at,
       max(l.version) AS versions
FROM inference_results AS r
INNER JOIN (SELECT study_uid, version, deid_study_uid FROM study_links) AS l
    ON l.deid_study_uid = r.study_uid AND l.version = r.version
GROUP BY l.study_uid
