-- Every worklist row into study_facts (073); duplicates handled there. The time a study was
-- signed is the updated_at of its first SIGNED row (the reading loop will write those).
CREATE MATERIALIZED VIEW IF NOT EXISTS study_facts_from_worklist TO study_facts AS
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
GROUP BY w.study_uid
