-- The arithmetic a job's model ran in (issue 3's per-job bf16 flag), as a column that cannot
-- disagree with the job's params: f32 jobs leave `precision` out of their params (and ids).
ALTER TABLE jobs ADD COLUMN precision TEXT
    GENERATED ALWAYS AS (coalesce(json_extract(params, '$.precision'), 'f32')) VIRTUAL;
