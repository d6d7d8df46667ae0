-- One reader's list: their open studies, opened first, then CRITICAL/STAT, URGENT, ROUTINE,
-- by SLA deadline within a level (the order assignment plans with).
SELECT study_uid, version, trace_id, accession_number, patient_name, modality, body_part, study_description,
       priority, subspecialty, source_site, status, ai_status, ai_findings, relevant_priors, prior_summary,
       assigned_reader, assigned_at, sla_deadline, assignment_reasons, reasons, received_at
FROM worklist FINAL
WHERE assigned_reader = {reader:String} AND status IN ('UNREAD', 'IN_PROGRESS')
ORDER BY status != 'IN_PROGRESS', multiIf(priority = 'CRITICAL', 0, priority = 'URGENT', 1, 2), sla_deadline, study_uid
LIMIT {limit:UInt32}
