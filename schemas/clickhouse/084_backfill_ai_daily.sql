-- Backfill, once: ai_daily is fed by 078's materialized view from the rows inserted after it
-- was created; a warehouse that had inference_results rows before gets them here, at the first start
-- that finds ai_daily without them, on the link's real day and site (078). Safe to repeat: its
-- states ignore duplicates.
INSERT INTO ai_daily
SELECT toDate(l.linked_at) AS day, r.model AS model, r.model_version AS model_version, r.backend AS backend,
       l.source_site AS site, label,
       uniqExactState(r.study_uid, r.version) AS runs,
       uniqExactIfState(r.study_uid, r.version, toUInt8(r.model_status = 'OK')) AS ok_runs,
       uniqExactIfState(r.study_uid, r.version, toUInt8(r.silent)) AS silent_runs,
       uniqExactIfState(r.study_uid, r.version, toUInt8(score >= threshold AND label != '')) AS flagged_runs,
       groupUniqArrayStateIf((r.study_uid, r.version, score), toUInt8(label != '')) AS scores,
       groupUniqArrayState((r.study_uid, r.version, r.latency_ms)) AS latencies_ms
FROM inference_results AS r
LEFT ARRAY JOIN r.labels AS label, r.scores AS score, r.thresholds AS threshold
INNER JOIN (SELECT deid_study_uid, version, min(linked_at) AS linked_at, any(toString(source_site)) AS source_site
            FROM study_links GROUP BY deid_study_uid, version) AS l
    ON l.deid_study_uid = r.study_uid AND l.version = r.version
WHERE (SELECT count() FROM ai_daily) = 0
GROUP BY day, model, model_version, backend, site, label
