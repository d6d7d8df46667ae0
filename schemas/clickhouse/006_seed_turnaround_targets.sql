-- Seeds the defaults once; a target an analyst already set is kept.
INSERT INTO turnaround_targets (priority, target_minutes)
SELECT p, m FROM (SELECT arrayJoin([('CRITICAL', 30), ('URGENT', 60), ('ROUTINE', 240)]) AS t, t.1 AS p, t.2 AS m)
WHERE p NOT IN (SELECT priority FROM turnaround_targets)
