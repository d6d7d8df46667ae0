-- Stage latencies of the studies first received in [since, now), grouped by {by} ('' = all):
-- per stage, how many studies reached it, the stage's own duration (from the stage it waits
-- on; 'received' from first to last instance) and the time since receipt, p50/p95 exact, in
-- seconds. Stages in pipeline order; 'ai' waits on de-identification, routing does not wait
-- for AI. 'opened' and 'signed' appear once the reading loop writes those stage events.
WITH
    ['received', 'assembled', 'deidentified', 'routed', 'ai', 'opened', 'signed'] AS stage_order,
    ['received', 'received', 'assembled', 'deidentified', 'deidentified', 'routed', 'opened'] AS waits_on,
    stages AS (
        SELECT study_uid, stage, min(first_started_at) AS started_at, min(first_finished_at) AS finished_at
        FROM stage_times GROUP BY study_uid, stage
    ),
    facts AS (
        SELECT study_uid, min(received_at) AS received_at,
               argMaxMerge(priority) AS priority, argMaxMerge(source_site) AS site, argMaxMerge(modality) AS modality,
               argMaxMerge(subspecialty) AS subspecialty, argMaxMerge(reader) AS reader
        FROM study_facts GROUP BY study_uid
    ),
    timed AS (
        SELECT s.study_uid AS study_uid, s.stage AS stage, s.finished_at AS finished_at,
               if(s.stage = 'received', s.started_at, p.finished_at) AS from_at,
               if(s.stage = 'received', s.started_at, r.started_at) AS receipt_at
        FROM stages AS s
        LEFT JOIN stages AS p ON p.study_uid = s.study_uid AND p.stage = waits_on[indexOf(stage_order, s.stage)]
        LEFT JOIN (SELECT study_uid, started_at FROM stages WHERE stage = 'received') AS r ON r.study_uid = s.study_uid
    )
SELECT
    multiIf({by:String} = 'site', f.site, {by:String} = 'modality', f.modality,
            {by:String} = 'priority', f.priority, {by:String} = 'subspecialty', f.subspecialty,
            {by:String} = 'reader', if(f.reader = '', '(unassigned)', f.reader),
            {by:String} = 'hour', toString(toStartOfHour(f.received_at)), 'all') AS grp,
    t.stage AS stage,
    uniqExact(t.study_uid) AS studies,
    round(quantileExact(0.5)(dateDiff('millisecond', t.from_at, t.finished_at)) / 1000, 3) AS p50_s,
    round(quantileExact(0.95)(dateDiff('millisecond', t.from_at, t.finished_at)) / 1000, 3) AS p95_s,
    round(quantileExact(0.5)(dateDiff('millisecond', t.receipt_at, t.finished_at)) / 1000, 3) AS since_receipt_p50_s,
    round(quantileExact(0.95)(dateDiff('millisecond', t.receipt_at, t.finished_at)) / 1000, 3) AS since_receipt_p95_s
FROM timed AS t
INNER JOIN facts AS f ON f.study_uid = t.study_uid
WHERE f.received_at >= {since:DateTime64(3, 'UTC')} AND f.received_at < {now:DateTime64(3, 'UTC')}
  AND t.from_at IS NOT NULL AND t.receipt_at IS NOT NULL
GROUP BY grp, stage
ORDER BY grp, indexOf(stage_order, stage)
SETTINGS join_use_nulls = 1
