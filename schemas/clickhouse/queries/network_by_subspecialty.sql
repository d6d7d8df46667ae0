-- The network view: open studies per subspecialty and priority, how many are unassigned,
-- and how many are past or within 15 minutes of their SLA deadline.
SELECT subspecialty, priority,
       count() AS open_studies,
       countIf(assigned_reader IS NULL) AS unassigned,
       countIf(sla_deadline < now64(3)) AS overdue,
       countIf(sla_deadline >= now64(3) AND sla_deadline < now64(3) + INTERVAL 15 MINUTE) AS due_within_15_min,
       uniqExact(assigned_reader) AS readers
FROM worklist FINAL
WHERE status IN ('UNREAD', 'IN_PROGRESS')
GROUP BY subspecialty, priority
ORDER BY subspecialty, multiIf(priority = 'CRITICAL', 0, priority = 'URGENT', 1, 2)
