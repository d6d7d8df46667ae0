-- The AI pre-read as the worklist shows it: PENDING until a result comes (the worklist never
-- waits for AI), then the result's status; active findings, and why there is no result.
ALTER TABLE worklist
    ADD COLUMN IF NOT EXISTS ai_status LowCardinality(String) DEFAULT 'NONE',
    ADD COLUMN IF NOT EXISTS ai_findings Array(String),
    ADD COLUMN IF NOT EXISTS ai_reason Nullable(String)
