-- The clinical indication of the study's HL7 order (OBR-31), when one was joined.
ALTER TABLE worklist ADD COLUMN IF NOT EXISTS reason_for_exam Nullable(String)
