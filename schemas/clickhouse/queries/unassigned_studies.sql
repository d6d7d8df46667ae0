-- Open studies on no reader's list (no eligible reader yet: licensure, credentials, shifts,
-- capacity), most urgent first, with the reasons assignment gave.
SELECT study_uid, version, trace_id, accession_number, modality, priority, subspecialty, source_site,
       patient_state, sla_deadline, assignment_reasons, received_at
FROM worklist FINAL
WHERE assigned_reader IS NULL AND status IN ('UNREAD', 'IN_PROGRESS')
ORDER BY multiIf(priority = 'CRITICAL', 0, priority = 'URGENT', 1, 2), ifNull(sla_deadline, received_at)
LIMIT {limit:UInt32}
