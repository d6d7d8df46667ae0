-- The dashboard's live worklist: the open studies (UNREAD, IN_PROGRESS) of the given source sites
-- ('*' among them: every site), latest version, most urgent first: CRITICAL, URGENT, ROUTINE, then
-- by SLA deadline (receipt where none was set), the order assignment plans with. With the AI
-- flags and why there are none, and the routing reasons; the gateway decides who sees which.
SELECT study_uid, version, trace_id, accession_number, patient_name, modality, body_part, study_description,
       priority, subspecialty, source_site, status, reasons, ai_status, ai_findings, ai_reason,
       assigned_reader, sla_deadline, received_at
FROM worklist FINAL
WHERE status IN ('UNREAD', 'IN_PROGRESS')
  AND (has({sites:Array(String)}, '*') OR has({sites:Array(String)}, toString(source_site)))
ORDER BY multiIf(priority = 'CRITICAL', 0, priority = 'URGENT', 1, 2), ifNull(sla_deadline, received_at), received_at,
         study_uid
LIMIT {limit:UInt32}
