-- The reading loop on the worklist row: when the reader opened and signed the study, and their
-- decision on each AI finding ('label: ACCEPT', 'label: REJECT', 'label: MODIFY -> text').
-- The stage_events rows 'opened' and 'signed' come from the same rows (turnaround report).
ALTER TABLE worklist
    ADD COLUMN IF NOT EXISTS opened_at Nullable(DateTime64(3, 'UTC')),
    ADD COLUMN IF NOT EXISTS signed_at Nullable(DateTime64(3, 'UTC')),
    ADD COLUMN IF NOT EXISTS reader_decisions Array(String)
