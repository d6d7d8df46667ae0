-- The worklist as a reader sees it: latest version per study, most urgent first, with the
-- patient's demographics as the site's latest ADT update states them (else as the images did),
-- and where each destination's output of the study's latest result revision stands.
WITH latest_patient AS (
    SELECT source_site, patient_id,
           argMax(patient_name, received_at) AS adt_patient_name,
           max(received_at) AS demographics_updated_at
    FROM patient_updates
    GROUP BY source_site, patient_id
),
latest_delivery AS (
    SELECT study_uid,
           arrayStringConcat(groupArray(concat(destination, ' r', toString(revision), ' ', status,
                                               ' (', toString(attempts), ')')), ', ') AS deliveries
    FROM (
        SELECT study_uid, destination, argMax(revision, at) AS revision, argMax(status, at) AS status,
               argMax(attempts, at) AS attempts
        FROM deliveries FINAL
        GROUP BY study_uid, destination
        ORDER BY destination
    )
    GROUP BY study_uid
)
SELECT w.study_uid AS study_uid, w.version AS version, w.trace_id AS trace_id,
       w.accession_number AS accession_number, w.patient_id AS patient_id,
       coalesce(p.adt_patient_name, w.patient_name) AS patient_name,
       w.modality AS modality, w.modalities AS modalities, w.body_part AS body_part,
       w.study_description AS study_description, w.priority AS priority, w.subspecialty AS subspecialty,
       w.source_site AS source_site, w.institution_name AS institution_name, w.instance_count AS instance_count,
       w.status AS status, w.reasons AS reasons, w.received_at AS received_at, w.assembled_at AS assembled_at,
       w.routed_at AS routed_at, w.reason_for_exam AS reason_for_exam,
       w.ai_status AS ai_status, w.ai_findings AS ai_findings, w.ai_reason AS ai_reason,
       w.relevant_priors AS relevant_priors, w.prior_summary AS prior_summary,
       w.prior_follow_up AS prior_follow_up, w.priors AS priors,
       w.assigned_reader AS assigned_reader, w.assigned_at AS assigned_at, w.sla_deadline AS sla_deadline,
       w.assignment_reasons AS assignment_reasons,
       p.demographics_updated_at AS demographics_updated_at, d.deliveries AS deliveries
FROM worklist AS w FINAL
LEFT JOIN latest_patient AS p ON p.source_site = w.source_site AND p.patient_id = ifNull(w.patient_id, '')
LEFT JOIN latest_delivery AS d ON d.study_uid = w.study_uid
ORDER BY multiIf(w.priority = 'CRITICAL', 0, w.priority = 'URGENT', 1, 2), ifNull(w.sla_deadline, w.received_at), w.received_at
LIMIT {limit:UInt32}
SETTINGS join_use_nulls = 1
