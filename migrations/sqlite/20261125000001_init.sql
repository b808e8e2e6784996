-- caf store schema, version 1. Additive changes only: later versions add new files.
-- Times are Unix seconds (REAL), written by caf itself so every backend agrees on the clock format.

CREATE TABLE studies (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    spec_path   TEXT    NOT NULL,
    spec_text   TEXT    NOT NULL,
    spec_sha256 TEXT    NOT NULL,
    seed        INTEGER NOT NULL,
    created_at  REAL    NOT NULL,
    updated_at  REAL    NOT NULL
);

-- Every spec revision a study was run with, so a report can show what changed.
CREATE TABLE study_revisions (
    study_id    INTEGER NOT NULL REFERENCES studies(id),
    spec_sha256 TEXT    NOT NULL,
    spec_text   TEXT    NOT NULL,
    created_at  REAL    NOT NULL,
    PRIMARY KEY (study_id, spec_sha256)
);

CREATE TABLE jobs (
    id             TEXT    PRIMARY KEY,             -- content hash of kind + params + deps
    kind           TEXT    NOT NULL,
    label          TEXT    NOT NULL,
    params         TEXT    NOT NULL,                -- canonical JSON
    status         TEXT    NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempts       INTEGER NOT NULL DEFAULT 0,
    max_attempts   INTEGER NOT NULL DEFAULT 3,
    not_before     REAL    NOT NULL DEFAULT 0,      -- retry backoff
    lease_owner    TEXT,
    lease_expires  REAL,
    progress_done  INTEGER NOT NULL DEFAULT 0,
    progress_total INTEGER NOT NULL DEFAULT 0,
    result         TEXT,                            -- JSON summary written on completion
    error          TEXT,
    created_at     REAL    NOT NULL,
    started_at     REAL,
    finished_at    REAL,
    run_seconds    REAL    NOT NULL DEFAULT 0       -- summed over attempts
);
CREATE INDEX jobs_status ON jobs(status);

CREATE TABLE job_deps (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    dep_id TEXT NOT NULL REFERENCES jobs(id),
    PRIMARY KEY (job_id, dep_id)
);

-- Which jobs the current revision of a study needs; `seq` is the plan order.
CREATE TABLE study_jobs (
    study_id    INTEGER NOT NULL REFERENCES studies(id),
    job_id      TEXT    NOT NULL REFERENCES jobs(id),
    spec_sha256 TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    PRIMARY KEY (study_id, job_id, spec_sha256)
);

-- One row per certified image: Cohen's columns plus the counts that let anyone recompute the bound.
CREATE TABLE cert_results (
    job_id    TEXT    NOT NULL REFERENCES jobs(id),
    idx       INTEGER NOT NULL,
    label     INTEGER NOT NULL,
    predict   INTEGER NOT NULL,     -- -1 = abstain
    radius    REAL    NOT NULL,
    correct   INTEGER NOT NULL,
    c_hat     INTEGER NOT NULL,     -- class chosen by the selection round
    n_a       INTEGER NOT NULL,
    n         INTEGER NOT NULL,
    n0        INTEGER NOT NULL,
    alpha     REAL    NOT NULL,
    sigma     REAL    NOT NULL,
    seconds   REAL    NOT NULL,
    PRIMARY KEY (job_id, idx)
);

-- One row per evaluated image of a clean-accuracy job.
CREATE TABLE eval_results (
    job_id  TEXT    NOT NULL REFERENCES jobs(id),
    idx     INTEGER NOT NULL,
    label   INTEGER NOT NULL,
    predict INTEGER NOT NULL,
    correct INTEGER NOT NULL,
    PRIMARY KEY (job_id, idx)
);

CREATE TABLE artifacts (
    job_id     TEXT    NOT NULL REFERENCES jobs(id),
    name       TEXT    NOT NULL,
    path       TEXT    NOT NULL,
    sha256     TEXT    NOT NULL,
    bytes      INTEGER NOT NULL,
    created_at REAL    NOT NULL,
    PRIMARY KEY (job_id, name)
);

CREATE TABLE events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      REAL    NOT NULL,
    job_id  TEXT,
    worker  TEXT,
    level   TEXT    NOT NULL,
    message TEXT    NOT NULL
);
CREATE INDEX events_job ON events(job_id);

CREATE TABLE workers (
    id         TEXT PRIMARY KEY,
    host       TEXT NOT NULL,
    pid        INTEGER NOT NULL,
    started_at REAL NOT NULL,
    last_seen  REAL NOT NULL
);
