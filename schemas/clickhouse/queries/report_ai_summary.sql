-- AI monitoring over the window, per model, model version, label and {by} (site, modality,
-- priority, subspecialty, reader): score drift and the readers' agreement.
-- Scores: the runs that scored the label on the days of [since, now) (ai_daily, 077, is by day;
-- each run once), their mean and exact p50, against the mean of as many days just before
-- (prev_score_mean; score_mean_change the difference, NULL with no run then). Runs reach
-- their study's modality, priority, subspecialty and reader through study_links and study_facts;
-- runs not yet linked are '(unlinked)'.
-- Agreement: the findings whose latest decision (ai_decisions, 110) was taken in [since, now),
-- grouped by the deciding reader for 'reader' and by the study for the rest: decided, accepted,
-- rejected, modified, agreement % (accepted of decided), critical_rejected (findings a critical
-- alert was raised for, rejected: the false-positive burden) and that per day of the window.
-- A group with decisions and no run in the window (the run was before it) has no scores.
WITH
    toDate({since:DateTime64(3, 'UTC')}) AS first_day,
    toDate({now:DateTime64(3, 'UTC')} - toIntervalMillisecond(1)) AS last_day,
    dateDiff('day', first_day, last_day) + 1 AS days,
    dateDiff('millisecond', {since:DateTime64(3, 'UTC')}, {now:DateTime64(3, 'UTC')}) / 86400000 AS window_days,
    facts AS (
        SELECT study_uid, argMaxMerge(source_site) AS site, argMaxMerge(modality) AS modality,
               argMaxMerge(priority) AS priority, argMaxMerge(subspecialty) AS subspecialty,
               argMaxMerge(reader) AS reader
        FROM study_facts GROUP BY study_uid
    ),
    links AS (SELECT deid_study_uid, any(study_uid) AS study_uid FROM study_links GROUP BY deid_study_uid),
    runs AS (
        SELECT model, model_version, label, site, run.1 AS deid_study_uid, toFloat64(run.3) AS score,
               day >= first_day AS current
        FROM (
            SELECT day, model, model_version, site, label, groupUniqArrayIfMerge(scores) AS scored_runs
            FROM ai_daily
            WHERE day >= first_day - days AND day <= last_day AND label != ''
            GROUP BY day, model, model_version, backend, site, label
        )
        ARRAY JOIN scored_runs AS run
    ),
    scores AS (
        SELECT r.model AS model, r.model_version AS model_version, r.label AS label,
               multiIf({by:String} = 'site', r.site, l.study_uid = '', '(unlinked)',
                       {by:String} = 'modality', f.modality, {by:String} = 'priority', f.priority,
                       {by:String} = 'subspecialty', f.subspecialty,
                       {by:String} = 'reader', if(f.reader = '', '(unassigned)', f.reader), 'all') AS grp,
               countIf(r.current) AS scored,
               if(scored = 0, NULL, round(avgIf(r.score, r.current), 4)) AS score_mean,
               if(scored = 0, NULL, round(quantileExactIf(0.5)(r.score, r.current), 4)) AS score_p50,
               if(countIf(NOT r.current) = 0, NULL, round(avgIf(r.score, NOT r.current), 4)) AS prev_score_mean
        FROM runs AS r
        LEFT JOIN links AS l ON l.deid_study_uid = r.deid_study_uid
        LEFT JOIN facts AS f ON f.study_uid = l.study_uid
        GROUP BY model, model_version, label, grp
        HAVING scored > 0
    ),
    decisions AS (
        SELECT study_uid, finding, max(decided_at) AS decided_at, argMaxMerge(decision) AS latest,
               latest.1 AS action, splitByChar(' ', latest.2)[1] AS model,
               substring(latest.2, position(latest.2, ' ') + 1) AS model_version, latest.3 AS score,
               latest.4 AS modified_to, latest.5 AS comment, latest.6 AS reader, latest.7 AS site
        FROM ai_decisions GROUP BY study_uid, finding
        HAVING decided_at >= {since:DateTime64(3, 'UTC')} AND decided_at < {now:DateTime64(3, 'UTC')}
    ),
    agreement AS (
        SELECT d.model AS model, d.model_version AS model_version, d.finding AS label,
               multiIf({by:String} = 'site', d.site, {by:String} = 'reader', d.reader,
                       f.study_uid = '', '(not on the worklist)',
                       {by:String} = 'modality', f.modality, {by:String} = 'priority', f.priority,
                       {by:String} = 'subspecialty', f.subspecialty, 'all') AS grp,
               count() AS decided, countIf(d.action = 'ACCEPT') AS accepted, countIf(d.action = 'REJECT') AS rejected,
               countIf(d.action = 'MODIFY') AS modified,
               countIf(d.action = 'REJECT' AND (d.study_uid, d.finding) IN (SELECT study_uid, finding FROM alerts
                                                                        WHERE finding != '')) AS critical_rejected
        FROM decisions AS d
        LEFT JOIN facts AS f ON f.study_uid = d.study_uid
        GROUP BY model, model_version, label, grp
    )
SELECT model, model_version, label, grp, scored, score_mean, score_p50, prev_score_mean,
       round(score_mean - prev_score_mean, 4) AS score_mean_change,
       decided, accepted, rejected, modified,
       if(decided = 0, NULL, round(100 * accepted / decided, 1)) AS agreement_pct,
       critical_rejected, round(critical_rejected / window_days, 2) AS critical_rejected_per_day
FROM scores
FULL OUTER JOIN agreement USING (model, model_version, label, grp)
ORDER BY model, model_version, label, grp
