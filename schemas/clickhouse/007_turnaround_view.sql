-- Turnaround per study (latest version): time from first receipt to each pipeline stage,
-- against the target of its priority. Reads and signatures join here when they exist.
CREATE OR REPLACE VIEW turnaround AS
SELECT
    w.study_uid,
    w.version,
    w.accession_number,
    w.priority,
    w.subspecialty,
    w.source_site,
    w.modality,
    w.received_at,
    w.assembled_at,
    w.routed_at,
    dateDiff('millisecond', w.received_at, w.assembled_at) / 1000.0 AS receipt_to_assembled_s,
    dateDiff('millisecond', w.received_at, w.routed_at) / 1000.0 AS receipt_to_worklist_s,
    t.target_minutes,
    w.received_at + toIntervalMinute(t.target_minutes) AS due_at,
    w.status
FROM (SELECT * FROM worklist FINAL) AS w
LEFT JOIN (SELECT priority, argMax(target_minutes, updated_at) AS target_minutes FROM turnaround_targets GROUP BY priority) AS t
    ON t.priority = w.priority
