-- Studies where AI and the final read disagree, for peer review: every AI finding of a study
-- signed in [since, now) whose latest decision (ai_decisions, 110) the signed read carries is a
-- REJECT or a MODIFY (the reader reports something else instead). The decisions stand on the
-- study whoever took them (they pass to the next reader on a release), so the deciding reader
-- and the signing one are both shown. critical: a critical alert was raised for the finding.
-- Not detectable here: a finding the reader added where the AI said nothing; the reading API
-- records decisions on AI findings only, and the signed report is free text.
WITH
    signed AS (
        SELECT study_uid, argMaxMerge(source_site) AS site, argMaxMerge(modality) AS modality,
               argMaxMerge(reader) AS signed_by, minIfMerge(signed_at) AS signed_at
        FROM study_facts GROUP BY study_uid
        HAVING signed_at >= {since:DateTime64(3, 'UTC')} AND signed_at < {now:DateTime64(3, 'UTC')}
    ),
    decisions AS (
        SELECT study_uid, finding, max(decided_at) AS decided_at, argMaxMerge(decision) AS latest,
               latest.1 AS action, splitByChar(' ', latest.2)[1] AS model,
               substring(latest.2, position(latest.2, ' ') + 1) AS model_version, latest.3 AS score,
               latest.4 AS modified_to, latest.5 AS comment, latest.6 AS reader, latest.7 AS site
        FROM ai_decisions
        WHERE study_uid IN (SELECT study_uid FROM signed)
        GROUP BY study_uid, finding
    )
SELECT d.study_uid AS study_uid, s.site AS site, s.modality AS modality, d.model AS model,
       d.model_version AS model_version, d.finding AS finding, d.score AS ai_score,
       toBool((d.study_uid, d.finding) IN (SELECT study_uid, finding FROM alerts WHERE finding != '')) AS critical,
       if(d.action = 'MODIFY', concat('MODIFY -> ', ifNull(d.modified_to, '')), d.action) AS reader_decision,
       d.reader AS reader, s.signed_by AS signed_by, s.signed_at AS signed_at, d.comment AS comment
FROM decisions AS d
INNER JOIN signed AS s ON s.study_uid = d.study_uid
WHERE d.action IN ('REJECT', 'MODIFY')
ORDER BY signed_at, study_uid, finding
