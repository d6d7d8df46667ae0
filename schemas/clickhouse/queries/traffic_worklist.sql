-- The worklist rows of the studies a synthetic traffic run sent (radstream load generate): is each
-- one there with every instance, its order joined (reason for exam) and its AI pre-read done?
SELECT study_uid, version, accession_number, modality, source_site, instance_count, priority, reasons,
       reason_for_exam, ai_status, status, received_at, routed_at
FROM worklist FINAL
WHERE study_uid IN {study_uids:Array(String)}
