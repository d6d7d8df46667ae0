-- Backfill, once: worklist_changes is fed by 076's materialized view from the rows inserted after it
-- was created; a warehouse that had worklist rows before gets them here, at the first start
-- that finds worklist_changes without them. Safe to repeat: re-inserted rows collapse on (study_uid, row_version).
INSERT INTO worklist_changes
SELECT w.study_uid AS study_uid, w.row_version AS row_version, ifNull(w.updated_at, w.routed_at) AS changed_at,
       ifNull(w.assigned_reader, '') AS assigned_reader, w.status AS status, w.priority AS priority,
       w.source_site AS source_site, w.modality AS modality, w.subspecialty AS subspecialty,
       w.sla_deadline AS sla_deadline
FROM worklist AS w
WHERE (SELECT count() FROM worklist_changes) = 0
