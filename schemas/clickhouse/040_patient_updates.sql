-- HL7 ADT patient updates (A01/A04/A05/A08/A31): the latest demographics of each patient
-- at each site. The worklist query applies them to that patient's identified rows
-- (queries/current_worklist.sql), whichever arrived first, study or update.
-- Re-delivered messages collapse on (source_site, patient_id, control_id).
CREATE TABLE IF NOT EXISTS patient_updates
(
    source_site        LowCardinality(String),
    patient_id         String COMMENT 'PID-3',
    control_id         String COMMENT 'MSH-10',
    message_type       LowCardinality(String),
    trace_id           String,
    received_at        DateTime64(3, 'UTC'),
    patient_name       Nullable(String) COMMENT 'PID-5',
    patient_birth_date Nullable(String) COMMENT 'PID-7',
    patient_sex        Nullable(String) COMMENT 'PID-8',
    patient_location   Nullable(String) COMMENT 'PV1-3',
    patient_state      Nullable(String)
)
ENGINE = ReplacingMergeTree(received_at)
ORDER BY (source_site, patient_id, control_id)
