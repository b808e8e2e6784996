-- A job's status change updates its study_jobs rows (the `open` flag, see claim_index) by
-- job id alone, and study_jobs' key starts with the study: without an index on job_id, every
-- completed job scanned the whole table, so a short-job sweep's per-job overhead grew with
-- its size (3.0 ms/job at 1,001 jobs, 5.0 at 10,001). job_deps by dep_id serves the walk from
-- a failed job to the jobs it blocks; PostgreSQL had that index from the start.
CREATE INDEX study_jobs_job ON study_jobs(job_id);
CREATE INDEX IF NOT EXISTS job_deps_dep ON job_deps(dep_id);
