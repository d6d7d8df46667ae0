-- AI agreement: per hour (UTC) in [since, now), the readers' final decision on each AI finding of
-- a study (the latest ACCEPT, MODIFY or REJECT of it in reader_feedback, counted in the hour it was
-- taken) and the share of findings accepted as the AI stated them. A replayed decision is one row
-- (reader_feedback collapses by feedback_id); a reader changing their mind counts once, as decided last.
SELECT toStartOfHour(decided_at) AS hour,
       countIf(decision = 'ACCEPT') AS accepted,
       countIf(decision = 'MODIFY') AS modified,
       countIf(decision = 'REJECT') AS rejected,
       round(100 * accepted / count(), 1) AS agreement_pct
FROM (
    SELECT study_uid, assumeNotNull(finding) AS finding, argMax(toString(action), at) AS decision, max(at) AS decided_at
    FROM reader_feedback FINAL
    WHERE action IN ('ACCEPT', 'MODIFY', 'REJECT') AND finding IS NOT NULL
    GROUP BY study_uid, finding
)
WHERE decided_at >= {since:DateTime64(3, 'UTC')} AND decided_at < {now:DateTime64(3, 'UTC')}
GROUP BY hour
ORDER BY hour
