-- What a sequential certification (issue 16) adds to its per-image row, so a reviewer can
-- recompute the certificate: (L, U) = mixture bound of (n_a successes in n draws) at level alpha
-- with a Beta(seq_prior_a, seq_prior_b) prior; the decision at each of seq_radii. For these rows
-- n is the number of estimation draws actually used (at most seq_n_max). All NULL for Cohen's
-- fixed-n rows, which are unchanged.
ALTER TABLE cert_results ADD COLUMN seq_n_max INTEGER;
ALTER TABLE cert_results ADD COLUMN seq_lower REAL;
ALTER TABLE cert_results ADD COLUMN seq_upper REAL;
ALTER TABLE cert_results ADD COLUMN seq_prior_a REAL;
ALTER TABLE cert_results ADD COLUMN seq_prior_b REAL;
-- JSON arrays: the requested radii and, per radius, certified / impossible / undecided.
ALTER TABLE cert_results ADD COLUMN seq_radii TEXT;
ALTER TABLE cert_results ADD COLUMN seq_decisions TEXT;
-- 1 when stop_if_wrong stopped the run after selection (c_hat != label, no estimation draws).
ALTER TABLE cert_results ADD COLUMN stopped_wrong INTEGER NOT NULL DEFAULT 0;
