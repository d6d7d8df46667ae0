-- What became of one reader action: 'applied' once the worklist applied it (reader_feedback),
-- 'refused' with the reason once it refused it (audit); no row while it is still on its way.
SELECT 'applied' AS outcome, '' AS reason
FROM reader_feedback
WHERE study_uid = {study_uid:String} AND feedback_id = {feedback_id:String}
UNION ALL
SELECT 'refused' AS outcome, detail['reason'] AS reason
FROM audit
WHERE action = 'reader-action-refused' AND study_uid = {study_uid:String}
  AND detail['feedback_id'] = {feedback_id:String}
LIMIT 1
