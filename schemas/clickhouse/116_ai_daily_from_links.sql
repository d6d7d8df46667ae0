-- ai_daily (077) for runs whose study link reached the warehouse after them: the sink writes links
-- and AI results from different topics, so either may come first (078 counts a run when its link
-- is already there; this, when the link arrives). The states are keyed by run: counted once.
CREATE MATERIALIZED VIEW IF NOT EXISTS ai_daily_from_links TO ai_daily AS
SELECT toDate(l.linked_at) AS day, r.model AS model, r.model_version AS model_version, r.backend AS backend,
       toString(l.source_site) AS site, r.label AS label,
       uniqExactState(r.study_uid, r.version) AS runs,
       uniqExactIfState(r.study_uid, r.version, toUInt8(r.model_status = 'OK')) AS ok_runs,
       uniqExactIfState(r.study_uid, r.version, toUInt8(r.silent)) AS silent_runs,
       uniqExactIfState(r.study_uid, r.version, toUInt8(r.score >= r.threshold AND r.label != '')) AS flagged_runs,
       groupUniqArrayStateIf((r.study_uid, r.version, r.score), toUInt8(r.label != '')) AS scores,
       groupUniqArrayState((r.study_uid, r.version, r.latency_ms)) AS latencies_ms
FROM study_links AS l
INNER JOIN (SELECT study_uid, version, model, model_version, backend, model_status, silent, latency_ms,
                   label, score, threshold
            FROM inference_results
            LEFT ARRAY JOIN labels AS label, scores AS score, thresholds AS threshold) AS r
    ON r.study_uid = l.deid_study_uid AND r.version = l.version
GROUP BY day, model, model_version, backend, site, label
