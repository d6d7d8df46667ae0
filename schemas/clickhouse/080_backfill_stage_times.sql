-- Backfill, once: stage_times is fed by 071's materialized view from the rows inserted after it
-- was created; a warehouse that had stage_events rows before gets them here, at the first start
-- that finds stage_times without them. Safe to repeat: its states ignore duplicates.
INSERT INTO stage_times
SELECT study_uid, stage,
       min(started_at) AS first_started_at, min(finished_at) AS first_finished_at,
       max(finished_at) AS last_finished_at, max(version) AS versions
FROM stage_events
WHERE (SELECT count() FROM stage_times WHERE stage != 'ai') = 0
GROUP BY study_uid, stage
