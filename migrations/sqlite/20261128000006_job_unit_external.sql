-- What a job's progress counts, and whether its results were imported rather than computed, as
-- columns of their own: the store used to infer both from job kinds ('train-*', 'import'), and
-- a store that knows job kinds must change with every new method.
ALTER TABLE jobs ADD COLUMN unit TEXT NOT NULL DEFAULT 'images';
ALTER TABLE jobs ADD COLUMN external INTEGER NOT NULL DEFAULT 0;
UPDATE jobs SET unit = 'epochs' WHERE kind LIKE 'train-%';
UPDATE jobs SET external = 1 WHERE kind = 'import';
