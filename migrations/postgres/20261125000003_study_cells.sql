-- Which grid cell of a study revision each result-producing job answers: the method, the cell's
-- parameters and the σ a model was trained and certified at. Jobs are shared between cells and
-- studies (and their labels are whatever the last plan called them), so reports read the
-- method and hyperparameters of a result from here.
CREATE TABLE study_cells (
    study_id      BIGINT  NOT NULL REFERENCES studies(id),
    spec_sha256   TEXT    NOT NULL,
    cell          BIGINT  NOT NULL,
    job_id        TEXT    NOT NULL REFERENCES jobs(id),
    method        TEXT    NOT NULL,
    kind          TEXT    NOT NULL,
    sigma         DOUBLE PRECISION,
    trained_sigma DOUBLE PRECISION,
    params        TEXT    NOT NULL,   -- the cell's parameters, JSON
    PRIMARY KEY (study_id, spec_sha256, cell, job_id)
);
