-- The Slurm jobs `caf submit --slurm` started for a study (one row per sbatch, each an array of
-- workers), so `caf status` can name them and an operator can `squeue`/`scancel` them.
CREATE TABLE slurm_jobs (
    study_id     INTEGER NOT NULL REFERENCES studies(id),
    slurm_job_id TEXT    NOT NULL,   -- as `sbatch --parsable` printed it: `ID` or `ID;CLUSTER`
    array_tasks  INTEGER NOT NULL,
    script       TEXT    NOT NULL,   -- the sbatch script it ran
    submitted_at REAL    NOT NULL,
    PRIMARY KEY (study_id, slurm_job_id)
);
