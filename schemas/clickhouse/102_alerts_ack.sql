-- Acknowledgement and escalation of critical alerts: the finding an alert is about (its AI
-- label, what an acknowledgement names), the deadline by which someone must acknowledge it, and
-- how many times it was raised again unacknowledged. finding and escalation_level join the
-- sorting key (ClickHouse allows appending columns added in the same ALTER), so two critical
-- findings of one study version, and each escalation of one, stay rows of their own instead of
-- collapsing into one (study_uid, version, alert_type). Rows from before have finding '' and level 0.
ALTER TABLE alerts
    ADD COLUMN IF NOT EXISTS finding String,
    ADD COLUMN IF NOT EXISTS escalation_level UInt8,
    ADD COLUMN IF NOT EXISTS ack_deadline Nullable(DateTime64(3, 'UTC')),
    MODIFY ORDER BY (study_uid, version, alert_type, finding, escalation_level)
