-- The AI pre-read as the stage 'ai' of the original study: inference_results is keyed by the
-- de-identified study UID, so each run is linked back through study_links at insert time.
-- Times: inferred_at is on the de-identified zone's shifted clock (a study's dates and times
-- move by its patient's shift there), so it cannot be compared with the real times of the other
-- stages. The stage starts when the study leaves de-identification (the link's linked_at, a
-- real time, written as the de-identified study is published) and ends latency_ms later (the
-- stage's own time, queue included). A run whose link is not in the warehouse yet is counted
-- when the link arrives (114). Duplicates: min/max states, see 070.
-- Cost: the join reads study_links (ordered by study_uid, not deid_study_uid) at each insert;
-- where that grows too large, a dictionary keyed by deid_study_uid should serve it instead.
CREATE MATERIALIZED VIEW IF NOT EXISTS stage_times_ai_from_inference TO stage_times AS
SELECT l.study_uid AS study_uid, 'ai' AS stage,
       min(l.linked_at) AS first_started_at,
       min(l.linked_at + toIntervalMillisecond(toInt64(r.latency_ms))) AS first_finished_at,
       max(l.linked_at + toIntervalMillisecond(toInt64(r.latency_ms))) AS last_finished_at,
       max(l.version) AS versions
FROM inference_results AS r
INNER JOIN (SELECT study_uid, version, deid_study_uid, linked_at FROM study_links) AS l
    ON l.deid_study_uid = r.study_uid AND l.version = r.version
GROUP BY l.study_uid
