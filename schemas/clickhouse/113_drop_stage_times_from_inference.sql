-- The first 'ai' stage view timed the stage with inferred_at, the de-identified zone's shifted
-- clock: AI times were off by the patient's date shift (days to years). 072 now creates
-- stage_times_ai_from_inference on real times; this drops the old view where it exists.
-- 'ai' rows it already wrote to stage_times keep their shifted times.
DROP VIEW IF EXISTS stage_times_from_inference
