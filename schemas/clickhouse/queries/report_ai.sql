-- AI monitoring per day (from {since}), model, version, backend, site and label: model runs,
-- how many ran OK and silent, how many flagged the label (score at or above its threshold),
-- the score distribution (exact p50/p90, mean) and its drift (the day's mean minus the mean
-- of every day shown for that model version, site and label), and run latency p50/p95 in ms.
-- Every figure is over distinct runs (077): re-deliveries do not count twice.
SELECT * EXCEPT (score_values, latency_values),
       round(score_mean - avg(score_mean) OVER (PARTITION BY model, model_version, site, label), 4) AS mean_shift
FROM (
    SELECT day, model, model_version, backend, site, label,
           uniqExactMerge(runs) AS runs,
           uniqExactIfMerge(ok_runs) AS ok,
           uniqExactIfMerge(silent_runs) AS silent,
           uniqExactIfMerge(flagged_runs) AS flagged,
           arrayMap(t -> toFloat64(t.3), groupUniqArrayIfMerge(scores)) AS score_values,
           arrayMap(t -> toFloat64(t.3), groupUniqArrayMerge(latencies_ms)) AS latency_values,
           if(empty(score_values), NULL, round(arrayReduce('quantileExact(0.5)', score_values), 4)) AS score_p50,
           if(empty(score_values), NULL, round(arrayReduce('quantileExact(0.9)', score_values), 4)) AS score_p90,
           if(empty(score_values), NULL, round(arrayAvg(score_values), 4)) AS score_mean,
           round(arrayReduce('quantileExact(0.5)', latency_values), 1) AS latency_p50_ms,
           round(arrayReduce('quantileExact(0.95)', latency_values), 1) AS latency_p95_ms
    FROM ai_daily
    WHERE day >= toDate({since:DateTime64(3, 'UTC')}) AND day <= toDate({now:DateTime64(3, 'UTC')})
    GROUP BY day, model, model_version, backend, site, label
)
ORDER BY day, model, model_version, site, label, backend
