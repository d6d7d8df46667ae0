-- Every reader decision on an AI finding (reader_feedback ACCEPT / REJECT / MODIFY) into
-- ai_decisions (110); duplicates handled there. Claims, opens, releases and signatures are not
-- decisions: the signature is in study_facts (073) from the SIGNED worklist row.
CREATE MATERIALIZED VIEW IF NOT EXISTS ai_decisions_from_reader_feedback TO ai_decisions AS
SELECT f.study_uid AS study_uid, ifNull(f.finding, '') AS finding,
       argMaxState((toString(f.action), ifNull(f.model, ''), f.score, f.modified_to, f.comment, toString(f.reader_id),
                    toString(f.source_site), f.version), (f.at, f.feedback_id)) AS decision,
       max(f.at) AS decided_at
FROM reader_feedback AS f
WHERE f.action IN ('ACCEPT', 'REJECT', 'MODIFY') AND f.finding IS NOT NULL
GROUP BY study_uid, finding
