-- The first ai_daily view bucketed runs by inferred_at, the de-identified zone's shifted clock,
-- and counted runs without a link under '(unlinked)' for good. 078 now creates
-- ai_daily_from_linked_inference on the link's real day and site (with 116 for late links);
-- this drops the old view where it exists. Rows it already wrote keep their shifted days.
DROP VIEW IF EXISTS ai_daily_from_inference
