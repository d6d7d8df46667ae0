-- Worklist depth over time: at the end of each step of {step_s} seconds from {since} to {now},
-- the open studies (UNREAD, IN_PROGRESS) on each list, grouped by {by} (reader by default;
-- '(unassigned)': routed, on nobody's list), and how many of them were past their SLA
-- deadline then. A study counts where its latest change at or before that time put it
-- (argMax by row_version over worklist_changes: re-delivered rows change nothing).
WITH
    arrayMap(i -> {since:DateTime64(3, 'UTC')} + toIntervalSecond(({step_s:UInt32}) * (i + 1)),
             range(toUInt32(ceil(dateDiff('millisecond', {since:DateTime64(3, 'UTC')}, {now:DateTime64(3, 'UTC')})
                                 / 1000 / {step_s:UInt32})))) AS ends,
    states AS (
        SELECT b.at AS at, c.study_uid AS study_uid,
               argMax(c.assigned_reader, c.row_version) AS reader, argMax(c.status, c.row_version) AS status,
               argMax(c.priority, c.row_version) AS priority, argMax(c.source_site, c.row_version) AS site,
               argMax(c.modality, c.row_version) AS modality, argMax(c.subspecialty, c.row_version) AS subspecialty,
               argMax(c.sla_deadline, c.row_version) AS sla_deadline
        FROM (SELECT arrayJoin(ends) AS at) AS b
        CROSS JOIN worklist_changes AS c
        WHERE c.changed_at <= b.at
        GROUP BY at, study_uid
    )
SELECT
    least(at, {now:DateTime64(3, 'UTC')}) AS at,
    multiIf({by:String} = 'site', site, {by:String} = 'modality', modality,
            {by:String} = 'priority', priority, {by:String} = 'subspecialty', subspecialty,
            if(reader = '', '(unassigned)', reader)) AS grp,
    count() AS open,
    countIf(status = 'UNREAD') AS unread,
    countIf(status = 'IN_PROGRESS') AS in_progress,
    countIf(sla_deadline IS NOT NULL AND sla_deadline < at) AS overdue
FROM states
WHERE status IN ('UNREAD', 'IN_PROGRESS')
GROUP BY at, grp
ORDER BY at, grp
