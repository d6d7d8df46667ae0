-- The worklist as a reader sees it: latest version per study, most urgent first.
SELECT study_uid, version, trace_id, accession_number, patient_id, patient_name, modality, modalities, body_part,
       study_description, priority, subspecialty, source_site, institution_name, instance_count, status, reasons,
       received_at, assembled_at, routed_at, reason_for_exam
FROM worklist FINAL
ORDER BY multiIf(priority = 'CRITICAL', 0, priority = 'URGENT', 1, 2), received_at
LIMIT {limit:UInt32}
