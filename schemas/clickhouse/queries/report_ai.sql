-- AI monitoring per day (the days of [since, now)), model, version, backend, site and label:
-- model runs, how many ran OK and silent, how many flagged the label (score at or above its threshold),
-- the score distribution (exact p50/p90, mean) and its drift (the day's mean minus the mean
-- of every day shown for that model version, site and label), and run latency p50/p95 in ms.
-- Every figure is over distinct runs (077): re-deliveries do not count twice.
-- Then the readers' word on the label's findings that day: findings whose latest decision
-- (110) was taken that day, agreement % (accepted of decided; the breakdown is in the report
-- by site, report_ai_summary) and critical_rejected, the false-positive burden: findings a
-- critical alert was raised for (alerts naming the finding) that the reader rejected.
-- Decisions name the model version, not the backend that ran it: they are shown on the row of
-- the first backend of that day, model version, site and label (a day with decisions and no
-- run of the label gets a row of its own).
WITH
    toDate({since:DateTime64(3, 'UTC')}) AS first_day,
    toDate({now:DateTime64(3, 'UTC')} - toIntervalMillisecond(1)) AS last_day,
    decisions AS (
        SELECT study_uid, finding, max(decided_at) AS decided_at, argMaxMerge(decision) AS latest,
               latest.1 AS action, splitByChar(' ', latest.2)[1] AS model,
               substring(latest.2, position(latest.2, ' ') + 1) AS model_version, latest.3 AS score,
               latest.4 AS modified_to, latest.5 AS comment, latest.6 AS reader, latest.7 AS site
        FROM ai_decisions GROUP BY study_uid, finding
    ),
    reader_days AS (
        SELECT toDate(decided_at) AS day, model, model_version, site, finding AS label,
               toUInt8(1) AS backend_rank,
               count() AS decided, countIf(action = 'ACCEPT') AS accepted,
               countIf(action = 'REJECT' AND (study_uid, finding) IN (SELECT study_uid, finding FROM alerts
                                                                    WHERE finding != '')) AS critical_rejected
        FROM decisions
        WHERE day >= first_day AND day <= last_day
        GROUP BY day, model, model_version, site, label
    ),
    runs AS (
        SELECT * EXCEPT (score_values, latency_values),
               toUInt8(row_number() OVER (PARTITION BY day, model, model_version, site, label ORDER BY backend))
                   AS backend_rank
        FROM (
            SELECT day, model, model_version, backend, site, label,
                   uniqExactMerge(runs) AS runs,
                   uniqExactIfMerge(ok_runs) AS ok,
                   uniqExactIfMerge(silent_runs) AS silent,
                   uniqExactIfMerge(flagged_runs) AS flagged,
                   arrayMap(t -> toFloat64(t.3), groupUniqArrayIfMerge(scores)) AS score_values,
                   arrayMap(t -> toFloat64(t.3), groupUniqArrayMerge(latencies_ms)) AS latency_values,
                   if(empty(score_values), NULL, round(arrayReduce('quantileExact(0.5)', score_values), 4))
                       AS score_p50,
                   if(empty(score_values), NULL, round(arrayReduce('quantileExact(0.9)', score_values), 4))
                       AS score_p90,
                   if(empty(score_values), NULL, round(arrayAvg(score_values), 4)) AS score_mean,
                   if(empty(latency_values), NULL, round(arrayReduce('quantileExact(0.5)', latency_values), 1))
                       AS latency_p50_ms,
                   if(empty(latency_values), NULL, round(arrayReduce('quantileExact(0.95)', latency_values), 1))
                       AS latency_p95_ms
            FROM ai_daily
            WHERE day >= first_day AND day <= last_day
            GROUP BY day, model, model_version, backend, site, label
        )
    )
SELECT day, model, model_version, backend, site, label, runs, ok, silent, flagged, score_p50, score_p90, score_mean,
       round(score_mean - avg(score_mean) OVER (PARTITION BY model, model_version, site, label), 4) AS mean_shift,
       latency_p50_ms, latency_p95_ms,
       decided, if(decided = 0, NULL, round(100 * accepted / decided, 1)) AS agreement_pct, critical_rejected
FROM runs
FULL OUTER JOIN reader_days USING (day, model, model_version, site, label, backend_rank)
ORDER BY day, model, model_version, site, label, backend
