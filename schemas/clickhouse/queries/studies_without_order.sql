-- Studies on the worklist that no HL7 order was joined to (no reason for exam, no order reason).
SELECT study_uid, version, accession_number, source_site, priority, received_at
FROM worklist FINAL
WHERE reason_for_exam IS NULL AND NOT arrayExists(r -> startsWith(r, 'order-'), reasons)
ORDER BY received_at
LIMIT {limit:UInt32}
