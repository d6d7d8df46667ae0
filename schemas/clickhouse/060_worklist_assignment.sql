-- Reader assignment as the worklist shows it: whose list the study is on, its SLA deadline,
-- and the filters and scores behind the choice (the full decision is in the audit table).
-- updated_at is the row's last change (routing, assignment, aging, a reader's action); the
-- row version counts from it, so a re-assignment replaces the row it moves.
ALTER TABLE worklist
    ADD COLUMN IF NOT EXISTS patient_state Nullable(String),
    ADD COLUMN IF NOT EXISTS assigned_reader Nullable(String),
    ADD COLUMN IF NOT EXISTS assigned_at Nullable(DateTime64(3, 'UTC')),
    ADD COLUMN IF NOT EXISTS sla_deadline Nullable(DateTime64(3, 'UTC')),
    ADD COLUMN IF NOT EXISTS assignment_reasons Array(String),
    ADD COLUMN IF NOT EXISTS updated_at Nullable(DateTime64(3, 'UTC'))
