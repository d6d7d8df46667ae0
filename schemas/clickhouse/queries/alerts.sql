-- Critical alerts per study and finding (the reading API's alert list, and what an acknowledgement
-- matches): the latest alert raised for the finding (the first, or its last escalation) with its
-- acknowledgement deadline and escalation level, and the first acknowledgement of the finding on any
-- version of the study, if any. open_only = 1: only those no one has acknowledged, most overdue first.
-- study_uid '': every study. Alerts that name no finding (raised before findings were named) are
-- not listed: nothing can acknowledge them.
SELECT a.study_uid AS study_uid, s.source_site AS source_site, a.finding AS finding,
       a.latest.1 AS version, a.latest.2 AS trace_id, a.latest.3 AS alert_type, a.latest.4 AS severity,
       a.latest.5 AS message, a.latest.6 AS finding_code, a.latest.7 AS escalation_level,
       a.first_raised AS first_raised_at, a.latest.8 AS raised_at, a.latest.9 AS ack_deadline,
       k.first.1 AS acknowledged_by, k.acked_at AS acknowledged_at, k.first.2 AS ack_note
FROM (
    SELECT study_uid, finding, min(raised_at) AS first_raised,
           argMax((version, trace_id, alert_type, severity, message, finding_code, escalation_level, raised_at,
                   ack_deadline), (escalation_level, raised_at)) AS latest
    FROM alerts FINAL
    WHERE finding != '' AND ({study_uid:String} = '' OR study_uid = {study_uid:String})
    GROUP BY study_uid, finding
) AS a
LEFT JOIN (
    SELECT study_uid, finding, min(at) AS acked_at, argMin((actor, note), at) AS first
    FROM alert_acks FINAL
    WHERE {study_uid:String} = '' OR study_uid = {study_uid:String}
    GROUP BY study_uid, finding
) AS k ON k.study_uid = a.study_uid AND k.finding = a.finding
LEFT JOIN (
    SELECT study_uid, any(source_site) AS source_site
    FROM worklist
    WHERE {study_uid:String} = '' OR study_uid = {study_uid:String}
    GROUP BY study_uid
) AS s ON s.study_uid = a.study_uid
WHERE NOT {open_only:UInt8} OR acknowledged_at IS NULL
ORDER BY acknowledged_at IS NOT NULL, ack_deadline, study_uid, finding
LIMIT {limit:UInt32}
SETTINGS join_use_nulls = 1
