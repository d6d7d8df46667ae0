-- Backfill, once: study_facts is fed by 074's materialized view from the rows inserted after it
-- was created; a warehouse that had worklist rows before gets them here, at the first start
-- that finds study_facts without them. Safe to repeat: its states ignore duplicates.
INSERT INTO study_facts
SELECT w.study_uid AS study_uid,
       argMaxState(toString(w.priority), w.row_version) AS priority,
       argMaxState(toString(w.source_site), w.row_version) AS source_site,
       argMaxState(toString(w.modality), w.row_version) AS modality,
       argMaxState(toString(w.subspecialty), w.row_version) AS subspecialty,
       argMaxState(ifNull(w.assigned_reader, ''), w.row_version) AS reader,
       argMaxState(toString(w.status), w.row_version) AS status,
       argMaxState(w.sla_deadline, w.row_version) AS sla_deadline,
       min(w.received_at) AS received_at,
       min(w.routed_at) AS first_routed_at,
       minIfState(toNullable(ifNull(w.updated_at, w.routed_at)), w.status = 'SIGNED') AS signed_at
FROM worklist AS w
WHERE (SELECT count() FROM study_facts) = 0
GROUP BY w.study_uid
