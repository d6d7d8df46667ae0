-- SLA compliance of the studies first received in [since, now), grouped by {by} ('' = all).
-- A study's deadline is the SLA deadline assignment gave it, else receipt + the target of its
-- priority (turnaround_targets). Signed on time / late once the reading loop signs studies;
-- until then open studies are overdue (past the deadline at {now}) or in time. Compliance:
-- on time / (signed + open overdue), NULL while no study's outcome is known.
WITH
    targets AS (SELECT priority, argMax(target_minutes, updated_at) AS target_minutes
                FROM turnaround_targets GROUP BY priority),
    facts AS (
        SELECT study_uid, min(received_at) AS received_at,
               argMaxMerge(priority) AS priority, argMaxMerge(source_site) AS site, argMaxMerge(modality) AS modality,
               argMaxMerge(subspecialty) AS subspecialty, argMaxMerge(reader) AS reader,
               argMaxMerge(sla_deadline) AS sla_deadline, minIfMerge(signed_at) AS signed_at
        FROM study_facts GROUP BY study_uid
    ),
    judged AS (
        SELECT f.*, coalesce(f.sla_deadline, f.received_at + toIntervalMinute(t.target_minutes)) AS deadline
        FROM facts AS f LEFT JOIN targets AS t ON t.priority = f.priority
        WHERE f.received_at >= {since:DateTime64(3, 'UTC')} AND f.received_at < {now:DateTime64(3, 'UTC')}
    )
SELECT
    multiIf({by:String} = 'site', site, {by:String} = 'modality', modality,
            {by:String} = 'priority', priority, {by:String} = 'subspecialty', subspecialty,
            {by:String} = 'reader', if(reader = '', '(unassigned)', reader),
            {by:String} = 'hour', toString(toStartOfHour(received_at)), 'all') AS grp,
    count() AS studies,
    countIf(signed_at IS NOT NULL AND signed_at <= deadline) AS signed_on_time,
    countIf(signed_at IS NOT NULL AND signed_at > deadline) AS signed_late,
    countIf(signed_at IS NULL AND deadline < {now:DateTime64(3, 'UTC')}) AS open_overdue,
    countIf(signed_at IS NULL AND deadline >= {now:DateTime64(3, 'UTC')}) AS open_in_time,
    countIf(deadline IS NULL) AS no_target,
    if(signed_on_time + signed_late + open_overdue = 0, NULL,
       round(100 * signed_on_time / (signed_on_time + signed_late + open_overdue), 1)) AS compliance_pct
FROM judged
GROUP BY grp
ORDER BY grp
SETTINGS join_use_nulls = 1
