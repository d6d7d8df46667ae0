-- Every worklist row into worklist_changes (075), stamped with its updated_at (rows from
-- before reader assignment have none: their routed_at).
CREATE MATERIALIZED VIEW IF NOT EXISTS worklist_changes_from_worklist TO worklist_changes AS
SELECT w.study_uid AS study_uid, w.row_version AS row_version, ifNull(w.updated_at, w.routed_at) AS changed_at,
       ifNull(w.assigned_reader, '') AS assigned_reader, w.status AS status, w.priority AS priority,
       w.source_site AS source_site, w.modality AS modality, w.subspecialty AS subspecialty,
       w.sla_deadline AS sla_deadline
FROM worklist AS w
