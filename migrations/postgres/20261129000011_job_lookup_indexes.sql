-- A job's status change updates its study_jobs rows (the `open` flag, see claim_index) by
-- job id alone, and study_jobs' key starts with the study: without an index on job_id, every
-- completed job scanned the whole table, so a short-job sweep's per-job overhead grew with
-- its size.
CREATE INDEX study_jobs_job ON study_jobs(job_id);
