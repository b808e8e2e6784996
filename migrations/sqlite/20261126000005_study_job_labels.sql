-- A job shared by two studies is one row of `jobs`, but each study's plan names it in its own
-- words (a sweep labels a cell by the values it sweeps). The label a study's reports and status
-- show is the study's own; NULL (rows planned before this version) falls back to `jobs.label`.
ALTER TABLE study_jobs ADD COLUMN label TEXT;
