-- One study's worklist row, latest version and update (the reading API's view of a study).
SELECT study_uid, version, trace_id, accession_number, patient_id, patient_name, modality, body_part,
       study_description, priority, subspecialty, source_site, status, reasons, received_at, routed_at,
       reason_for_exam, ai_status, ai_findings, ai_reason, relevant_priors, prior_summary, prior_follow_up, priors,
       assigned_reader, assigned_at, sla_deadline, assignment_reasons, opened_at, signed_at, reader_decisions
FROM worklist FINAL
WHERE study_uid = {study_uid:String}
LIMIT 1
