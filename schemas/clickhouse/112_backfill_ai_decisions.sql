-- Backfill, once: ai_decisions is fed by 111's materialized view from the rows inserted after it
-- was created; a warehouse that had reader_feedback rows before gets them here, at the first start
-- that finds ai_decisions without them. Safe to repeat: its states ignore duplicates.
INSERT INTO ai_decisions
SELECT f.study_uid AS study_uid, ifNull(f.finding, '') AS finding,
       argMaxState((toString(f.action), ifNull(f.model, ''), f.score, f.modified_to, f.comment, toString(f.reader_id),
                    toString(f.source_site), f.version), (f.at, f.feedback_id)) AS decision,
       max(f.at) AS decided_at
FROM reader_feedback AS f
WHERE f.action IN ('ACCEPT', 'REJECT', 'MODIFY') AND f.finding IS NOT NULL
  AND (SELECT count() FROM ai_decisions) = 0
GROUP BY study_uid, finding
