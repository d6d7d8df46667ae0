-- When each stage first started and first finished for the studies a synthetic traffic run sent
-- (radstream load generate); the run's per-stage latencies are computed from these rows.
-- The AI pre-read's times are real ones (072/114: from the link's linked_at, written when
-- de-identification ends, for the stage's own latency_ms; inferred_at is on the shifted clock).
SELECT study_uid, stage, min(first_started_at) AS started_at, min(first_finished_at) AS finished_at
FROM stage_times
WHERE study_uid IN {study_uids:Array(String)}
GROUP BY study_uid, stage
