-- Every stage_events row (received, assembled, deidentified, routed; later opened, signed)
-- into stage_times. Duplicates: min/max states, see 070.
CREATE MATERIALIZED VIEW IF NOT EXISTS stage_times_from_stage_events TO stage_times AS
SELECT study_uid, stage,
       min(started_at) AS first_started_at, min(finished_at) AS first_finished_at,
       max(finished_at) AS last_finished_at, max(version) AS versions
FROM stage_events
GROUP BY study_uid, stage
