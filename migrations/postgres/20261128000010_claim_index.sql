-- Claims walk a study's jobs in plan order and took the first claimable one; with finished
-- jobs in that walk, each claim cost O(jobs done so far). `open` (a job neither done nor
-- failed) is kept by triggers, whatever statement changes a job, and a partial index on it
-- lets a claim start at the first open job of the study.
ALTER TABLE study_jobs ADD COLUMN open BOOLEAN NOT NULL DEFAULT TRUE;

UPDATE study_jobs SET open = FALSE
 WHERE job_id IN (SELECT id FROM jobs WHERE status IN ('done', 'failed'));

CREATE INDEX study_jobs_open ON study_jobs(study_id, spec_sha256, seq) WHERE open;

CREATE FUNCTION caf_study_jobs_open_on_insert() RETURNS trigger AS $$
BEGIN
    NEW.open := NOT EXISTS (SELECT 1 FROM jobs WHERE id = NEW.job_id AND status IN ('done', 'failed'));
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER study_jobs_open_on_insert BEFORE INSERT ON study_jobs
FOR EACH ROW EXECUTE FUNCTION caf_study_jobs_open_on_insert();

CREATE FUNCTION caf_jobs_status_keeps_open() RETURNS trigger AS $$
BEGIN
    UPDATE study_jobs SET open = (NEW.status NOT IN ('done', 'failed')) WHERE job_id = NEW.id;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER jobs_status_keeps_open AFTER UPDATE OF status ON jobs
FOR EACH ROW
WHEN ((OLD.status IN ('done', 'failed')) IS DISTINCT FROM (NEW.status IN ('done', 'failed')))
EXECUTE FUNCTION caf_jobs_status_keeps_open();
