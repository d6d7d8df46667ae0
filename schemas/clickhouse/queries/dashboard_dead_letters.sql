-- Dead letters per hour (UTC) in [since, now), by the stage that wrote them and their reason
-- (FINAL: a letter the sink wrote twice counts once). What `radstream deadletters list` lists
-- one by one; `undecodable` and `unexpected_event` are bad input, `service_unavailable` and
-- `stage_error` wait for `radstream deadletters replay`.
SELECT toStartOfHour(failed_at) AS hour, stage, reason, count() AS letters
FROM dead_letters FINAL
WHERE failed_at >= {since:DateTime64(3, 'UTC')} AND failed_at < {now:DateTime64(3, 'UTC')}
GROUP BY hour, stage, reason
ORDER BY hour, stage, reason
