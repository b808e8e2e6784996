-- Interruptions (a worker told to stop by SIGUSR2/SIGTERM, or one whose lease expired because it
-- was killed or its node was lost) are counted apart from attempts: only a job's own error costs
-- an attempt, and a job that never fits in one allocation still stops after its own cap.
ALTER TABLE jobs ADD COLUMN interruptions INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN max_interruptions INTEGER NOT NULL DEFAULT 20;
-- The machine that produced a finished job's results (training differs between CPU models).
ALTER TABLE jobs ADD COLUMN ran_host TEXT;
ALTER TABLE jobs ADD COLUMN ran_cpu TEXT;
ALTER TABLE jobs ADD COLUMN ran_device TEXT;
-- Who a worker is on a cluster, and when it stopped (NULL: running, or killed without a word).
ALTER TABLE workers ADD COLUMN cpu TEXT;
ALTER TABLE workers ADD COLUMN device TEXT;
ALTER TABLE workers ADD COLUMN slurm_job_id TEXT;
ALTER TABLE workers ADD COLUMN slurm_array_job_id TEXT;
ALTER TABLE workers ADD COLUMN slurm_array_task_id TEXT;
ALTER TABLE workers ADD COLUMN studies TEXT;
ALTER TABLE workers ADD COLUMN stopped_at REAL;
