-- One study's worklist row, latest version and update (the reading API's view of a study), with
-- its latest result revision: the draft preliminary report the reader edits and signs, or what was signed.
SELECT study_uid, version, trace_id, accession_number, patient_id, patient_name, modality, body_part,
       study_description, priority, subspecialty, source_site, status, reasons, received_at, routed_at,
       reason_for_exam, ai_status, ai_findings, ai_reason, relevant_priors, prior_summary, prior_follow_up, priors,
       assigned_reader, assigned_at, sla_deadline, assignment_reasons, opened_at, signed_at, reader_decisions,
       (SELECT argMax(report_text, revision) FROM results WHERE study_uid = {study_uid:String}) AS report_text,
       (SELECT argMax(status, revision) FROM results WHERE study_uid = {study_uid:String}) AS result_status,
       (SELECT max(revision) FROM results WHERE study_uid = {study_uid:String}) AS result_revision
FROM worklist FINAL
WHERE study_uid = {study_uid:String}
LIMIT 1
