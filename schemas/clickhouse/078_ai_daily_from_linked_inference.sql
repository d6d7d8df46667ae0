-- Every inference_results row (one model run) into ai_daily (077), one row per label it scored,
-- once its study link is in the warehouse (116 counts the runs whose link comes after them).
-- day: the real day of the run, the link's linked_at. inferred_at is on the de-identified zone's
-- clock, moved by the patient's date shift (days to years), so a day taken from it put runs on
-- days they did not happen on. site: the original site, from the same link.
CREATE MATERIALIZED VIEW IF NOT EXISTS ai_daily_from_linked_inference TO ai_daily AS
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
GROUP BY day, model, model_version, backend, site, label
