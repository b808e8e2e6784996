-- Per-epoch metrics of training jobs (loss, noisy train/validation accuracy, throughput), as JSON
-- so new metrics need no schema change.
CREATE TABLE train_metrics (
    job_id  TEXT    NOT NULL REFERENCES jobs(id),
    epoch   BIGINT  NOT NULL,
    metrics TEXT    NOT NULL,
    at      DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (job_id, epoch)
);
