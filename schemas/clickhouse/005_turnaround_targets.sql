-- Turnaround targets per priority, as data: analysts change them with an INSERT, not a deploy.
-- STAT/critical 30 min, urgent 60 min, routine 4 h (the low end of the usual 4-8 h).
CREATE TABLE IF NOT EXISTS turnaround_targets
(
    priority       LowCardinality(String),
    target_minutes UInt32,
    updated_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY priority
