//! Method `smooth`: certify a given model as it is (Cohen et al.'s randomized smoothing; on a
//! clean model, the baseline certifying adapters must beat), next to its clean accuracy.

use super::certify_job::{self, cell_precision, cell_settings, cell_sigma, CERTIFY_KEYS};
use super::common;
use crate::plan::{Job, PlanContext};
use crate::spec::{Cell, SpecError};

pub fn plan(cell: &Cell, ctx: &mut PlanContext<'_>) -> Result<Vec<Job>, SpecError> {
    let mut allowed = vec!["backbone", "sigma"];
    allowed.extend(CERTIFY_KEYS);
    common::check_known(cell, ctx, "smooth", &allowed)?;
    let (backbone, model) = super::backbone::of_cell(cell, ctx)?;
    let data = common::test_data_ref(ctx)?;
    let sigma = cell_sigma(cell, ctx, "smooth")?;
    let (s, slice) = cell_settings(cell, ctx)?;
    let precision = cell_precision(cell, ctx)?;
    let eval = super::eval::job(&backbone, model.clone(), data, slice, s.batch, precision);
    let cert = certify_job::certify_job(
        cell,
        ctx,
        model,
        format!("smooth {backbone} σ={sigma}"),
        sigma,
    )?;
    Ok(vec![eval, cert])
}
