-- HL7 orders (ORM^O01) and patient updates (ADT), one row per message and order group.
-- An order whose images never arrive is visible here (named query unmatched_orders);
-- re-delivered messages collapse on (accession_number, control_id, message_type).
CREATE TABLE IF NOT EXISTS orders
(
    accession_number      String COMMENT 'empty for ADT patient updates',
    control_id            String COMMENT 'MSH-10',
    message_type          LowCardinality(String),
    trace_id              String,
    source_site           LowCardinality(String),
    received_at           DateTime64(3, 'UTC'),
    order_control         Nullable(String) COMMENT 'ORC-1: NW new, XO change, CA cancel',
    study_uid             Nullable(String) COMMENT 'ZDS-1 when the RIS sent it',
    patient_id            Nullable(String),
    patient_name          Nullable(String),
    priority              Nullable(String) COMMENT 'TQ1-9 / OBR-27: S = STAT',
    ordering_provider     Nullable(String),
    reason_for_exam       Nullable(String),
    procedure_code        Nullable(String),
    procedure_description Nullable(String),
    patient_location      Nullable(String),
    patient_state         Nullable(String)
)
ENGINE = ReplacingMergeTree(received_at)
ORDER BY (accession_number, control_id, message_type)
