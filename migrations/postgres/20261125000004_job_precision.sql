-- The arithmetic a job's model ran in (issue 3's per-job bf16 flag), as a column that cannot
-- disagree with the job's params: f32 jobs leave `precision` out of their params (and ids).
-- PostgreSQL has no virtual generated columns before 18: a stored one, from the JSON text.
ALTER TABLE jobs ADD COLUMN precision TEXT
    GENERATED ALWAYS AS (coalesce((params::jsonb)->>'precision', 'f32')) STORED;
