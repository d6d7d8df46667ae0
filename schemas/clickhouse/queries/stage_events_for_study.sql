-- Every stage a study went through, in order (audit trail of one study).
SELECT study_uid, version, stage, trace_id, source_site, started_at, finished_at, detail
FROM stage_events FINAL
WHERE study_uid = {study_uid:String}
ORDER BY version, finished_at
