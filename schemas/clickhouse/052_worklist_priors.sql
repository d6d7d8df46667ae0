-- Prior comparison as the worklist shows it: how many of the patient's earlier studies are
-- relevant, the comparison with the most recent one, follow-up flags, and every candidate
-- prior with the rule that made it relevant or the reason it is not.
ALTER TABLE worklist
    ADD COLUMN IF NOT EXISTS relevant_priors UInt16 DEFAULT 0,
    ADD COLUMN IF NOT EXISTS prior_summary Nullable(String),
    ADD COLUMN IF NOT EXISTS prior_follow_up Array(String),
    ADD COLUMN IF NOT EXISTS priors Array(String)
