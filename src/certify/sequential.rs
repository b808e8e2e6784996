//! Anytime-valid sequential certification: draw estimation samples in batches and stop as soon
//! as every requested radius is decided, instead of always drawing Cohen et al. 2019's fixed n.
//!
//! The bound is the beta-binomial mixture confidence sequence (Robbins 1970, "Statistical
//! methods related to the law of the iterated logarithm"; Howard, Ramdas, McAuliffe & Sekhon
//! 2021, "Time-uniform, nonparametric, nonasymptotic confidence sequences", Ann. Statist.;
//! Waudby-Smith & Ramdas 2024, "Estimating means of bounded random variables by betting",
//! JRSS-B). With a Beta(a, b) mixing prior, after t draws with S successes
//!
//! ```text
//!   M_t(p) = B(a + S, b + t − S) / (B(a, b) · p^S · (1 − p)^(t − S))
//! ```
//!
//! is a nonnegative martingale with M_0 = 1 under the true p (it is the Bayes factor of the
//! prior mixture against the point p), so Ville's inequality gives P(∃t: M_t(p) ≥ 1/α) ≤ α and
//! C_t = {p : M_t(p) < 1/α} is a (1 − α) confidence sequence: it covers p at every t at once,
//! hence also at any data-dependent stopping time τ. That is what makes "look after every batch
//! and stop when decided" valid, which repeated Clopper–Pearson intervals are not.
//!
//! A certificate from this module is recomputable from (ĉ, S = n_A, τ, α, a, b, σ) alone:
//! [`mixture_lower_upper`] gives (L_τ, U_τ) and the radius is σ·Φ⁻¹(L_τ) when L_τ > 1/2.
//!
//! The simplest valid alternative, [`certify_staged`], looks only at a few fixed sample sizes
//! with α split equally (Bonferroni) and one-sided Clopper–Pearson bounds at each.
//!
//! What it buys, from `cargo test --lib certify::sequential::tests::savings_table -- --ignored
//! --nocapture` (simulated counts, 1,000 runs per p, σ = 0.25, radii {0.25, 0.5, 0.75, 1.0},
//! α = 0.001, batch 400, n_max = 100,000; fraction certified at r = 0.75 in brackets):
//!
//! ```text
//!   p_A     mixture (mean draws)   staged CP {1e3,1e4,1e5}   Cohen n = 1e5
//!   0.6        400                  1,000                     100,000
//!   0.8      2,072                  5,554                     100,000
//!   0.9        924                  1,108                     100,000
//!   0.99     2,540                  9,028                     100,000
//!   0.999   97,290 [0.09]         100,000 [0.34]              100,000 [0.54]
//! ```
//!
//! Decisions at the other radii were the same for all three methods; near a threshold (p_A =
//! 0.999 against Φ(3) = 0.99865 for r = 0.75) the wider mixture bound certifies less often
//! within the same budget: the price of stopping early everywhere else.

use statrs::distribution::{ContinuousCDF, Normal};
use statrs::function::gamma::ln_gamma;

use super::{stats, CertifyError};

/// Errors of the sequential procedures.
#[derive(Debug, thiserror::Error)]
pub enum SequentialError {
    #[error("invalid sequential certification settings: {0}")]
    Settings(String),
    #[error("the sampler reported {got} hits out of {asked} draws")]
    SamplerOverflow { got: u64, asked: usize },
    #[error("the sampler returned counts for {got} members, not {want}")]
    SamplerMembers { got: usize, want: usize },
    #[error(transparent)]
    Certify(#[from] CertifyError),
}

/// The Beta(a, b) mixing distribution of the confidence sequence.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BetaPrior {
    pub a: f64,
    pub b: f64,
}

impl BetaPrior {
    /// Jeffreys' Beta(1/2, 1/2): by Laplace's method the boundary solves
    /// t·KL(S/t ‖ p) ≈ ln(1/α) + ½·ln(t/2π) − ln(π(p̂)·√(p̂(1 − p̂))), whose last term is
    /// constant for the arcsine density, so Jeffreys pays the same price at every p̂.
    pub const JEFFREYS: BetaPrior = BetaPrior { a: 0.5, b: 0.5 };

    /// The default, Beta(1, 1/4) (density ∝ (1 − p)^(−3/4)): certified radii are decided by
    /// 1 − L near 1, where Jeffreys's ½·ln t price is dearest in radius, so the prior leans its
    /// mass towards 1; at p = 0.5–0.9 that costs under 0.001 in radius against Jeffreys.
    ///
    /// Measured with `cargo test --lib certify::sequential::tests::prior_width_table --
    /// --ignored --nocapture`: radius loss = σ·(Φ⁻¹(L_CP) − Φ⁻¹(L_mix)) at σ = 0.25,
    /// α = 0.001, S = round(p·t), L_CP the one-sided Clopper–Pearson bound at the same fixed t
    /// (what Cohen's CERTIFY would report had it stopped there):
    ///
    /// ```text
    ///   p      t=1e3  t=1e4  t=1e5 | Beta(1/2,1/2): 1e3   1e4    1e5  | Beta(1,1): 1e3  1e5
    ///   0.5    0.0156 0.0057 0.0020 |          0.0147 0.0055 0.0020 |     0.0137 0.0019
    ///   0.6    0.0153 0.0057 0.0020 |          0.0147 0.0055 0.0020 |     0.0138 0.0019
    ///   0.8    0.0161 0.0061 0.0022 |          0.0162 0.0062 0.0022 |     0.0156 0.0022
    ///   0.9    0.0179 0.0070 0.0026 |          0.0187 0.0073 0.0027 |     0.0188 0.0027
    ///   0.99   0.0268 0.0129 0.0051 |          0.0313 0.0146 0.0056 |     0.0368 0.0063
    ///   0.999  0.0297 0.0225 0.0109 |          0.0414 0.0279 0.0129 |     0.0564 0.0158
    /// ```
    ///
    /// Other priors tried: Beta(2, 1/4) and Beta(1, 1/10) gain under 0.002 more at p = 0.999
    /// and lose up to 0.0016 more at 0.5; Beta(4, 1/2) is no better at 0.999 and worse at 0.5.
    /// In 1 − L for Beta(1, 1/4) against Clopper–Pearson: p = 0.999: 1.26e-2 vs 9.20e-3
    /// (t = 1e3), 3.18e-3 vs 2.41e-3 (1e4), 1.56e-3 vs 1.35e-3 (1e5); p = 0.9: 1.49e-1 vs
    /// 1.33e-1, 1.15e-1 vs 1.10e-1, 1.048e-1 vs 1.030e-1. The width U − L is 1.37–1.67 times
    /// Clopper–Pearson's (one-sided α at each end) over the grid, largest at p = 0.5 and
    /// t = 1e5: the price of being valid at every t, growing like √(ln t).
    pub const DEFAULT_PRIOR: BetaPrior = BetaPrior { a: 1.0, b: 0.25 };

    pub fn validate(&self) -> Result<(), SequentialError> {
        if !(self.a.is_finite() && self.a > 0.0 && self.b.is_finite() && self.b > 0.0) {
            return Err(SequentialError::Settings(format!(
                "prior Beta(a, b) needs finite a, b > 0, got ({}, {})",
                self.a, self.b
            )));
        }
        Ok(())
    }

    fn is_valid(&self) -> bool {
        self.validate().is_ok()
    }
}

impl Default for BetaPrior {
    fn default() -> Self {
        Self::DEFAULT_PRIOR
    }
}

/// ln B(x, y) from three log-gammas. For x, y up to ~1e5 the cancellation costs ~1e-10 in
/// absolute terms, which moves the bounds by ~1e-13: far below what matters for a radius.
fn ln_beta(x: f64, y: f64) -> f64 {
    ln_gamma(x) + ln_gamma(y) - ln_gamma(x + y)
}

/// ln M_t(p) up to the p-independent part: `log_mix` is ln B(a+S, b+F) − ln B(a, b).
fn ln_m(log_mix: f64, s: f64, f: f64, p: f64) -> f64 {
    // Zero counts are skipped, not multiplied: 0·ln 0 would be NaN at the ends.
    let mut v = log_mix;
    if s > 0.0 {
        v -= s * p.ln();
    }
    if f > 0.0 {
        v -= f * (-p).ln_1p();
    }
    v
}

/// The p-independent part of ln M_t: ln B(a + S, b + F) − ln B(a, b).
fn log_mixture(successes: u64, trials: u64, prior: BetaPrior) -> f64 {
    log_mixture_given(successes, trials, prior, ln_beta(prior.a, prior.b))
}

/// [`log_mixture`] with ln B(a, b) computed once by the caller (the driver looks often).
fn log_mixture_given(successes: u64, trials: u64, prior: BetaPrior, ln_beta_prior: f64) -> f64 {
    let (s, f) = (successes as f64, (trials - successes) as f64);
    ln_beta(prior.a + s, prior.b + f) - ln_beta_prior
}

/// ln M_t(p) of the beta-binomial mixture martingale (module docs), for a reviewer or a test
/// that wants the process itself. NaN for successes > trials, p outside [0, 1] or a bad prior.
pub fn log_mixture_martingale(successes: u64, trials: u64, p: f64, prior: BetaPrior) -> f64 {
    if successes > trials || !(0.0..=1.0).contains(&p) || !prior.is_valid() {
        return f64::NAN;
    }
    let (s, f) = (successes as f64, (trials - successes) as f64);
    ln_m(log_mixture(successes, trials, prior), s, f, p)
}

/// (L_t, U_t) = (inf, sup) of C_t = {p : M_t(p) < 1/α}: the (1 − α) beta-binomial mixture
/// confidence sequence for a Bernoulli mean after `successes` of `trials` draws, valid at every
/// t simultaneously (Ville's inequality; module docs).
///
/// Used as a one-sided lower bound (certification), L_t keeps level α and is conservative:
/// P(∃t: p < L_t) ≤ P(∃t: p ∉ C_t) ≤ α, the event p > U_t being spent as well.
///
/// ln M_t(p) is strictly convex in p with its minimum at the MLE S/t, where M_t ≤ 1 < 1/α (a
/// mixture of likelihoods never exceeds the maximum likelihood), so C_t is an interval holding
/// S/t and each end is the unique root of ln M_t(p) − ln(1/α) on its side, found by bisection
/// to 1e-14 in p. L is returned from the excluded side of the root (never above the exact
/// bound), U likewise. L = 0 when S = 0 and U = 1 when S = t (M_t stays below 1/α there).
/// `trials` = 0 gives (0, 1); successes > trials, α ∉ (0, 1) or a bad prior give NaNs.
pub fn mixture_lower_upper(
    successes: u64,
    trials: u64,
    alpha: f64,
    prior: BetaPrior,
) -> (f64, f64) {
    if successes > trials || !(alpha > 0.0 && alpha < 1.0) || !prior.is_valid() {
        return (f64::NAN, f64::NAN);
    }
    if trials == 0 {
        return (0.0, 1.0);
    }
    let (s, f) = (successes as f64, (trials - successes) as f64);
    let log_mix = log_mixture(successes, trials, prior);
    let level = -alpha.ln();
    // g > 0 ⇔ p is excluded from C_t.
    let g = |p: f64| ln_m(log_mix, s, f, p) - level;
    let mle = s / (s + f);
    let lower = if successes == 0 {
        0.0
    } else {
        // g(0+) = +∞ (S > 0) and g(mle) < 0.
        bisect(0.0, mle, g)
    };
    let upper = if successes == trials {
        1.0
    } else {
        // g(1−) = +∞ (F > 0) and g(mle) < 0; returned from above, so never too narrow.
        bisect(1.0, mle, g)
    };
    (lower, upper)
}

/// Bisection between `out` (g > 0 side, excluded) and `inside` (g < 0), returning the last
/// excluded point: the bound never lies on the inside of the exact one.
fn bisect(mut out: f64, mut inside: f64, g: impl Fn(f64) -> f64) -> f64 {
    for _ in 0..200 {
        if (inside - out).abs() <= 1e-14 {
            break;
        }
        let mid = 0.5 * (out + inside);
        if mid == out || mid == inside {
            break;
        }
        if g(mid) > 0.0 {
            out = mid;
        } else {
            inside = mid;
        }
    }
    out
}

/// Where a requested radius stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// The lower bound is above Φ(r/σ): the smoothed classifier is certified at r.
    Certified,
    /// The upper bound is below Φ(r/σ): p_A is (with the same confidence) too small for r,
    /// so further sampling would only spend draws.
    Impossible,
    /// Neither: the draw budget ran out first.
    Undecided,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Certified => "certified",
            Decision::Impossible => "impossible",
            Decision::Undecided => "undecided",
        }
    }
}

/// The decision at one radius.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RadiusDecision {
    pub radius: f64,
    /// Φ(r/σ), the p_A the radius needs.
    pub threshold: f64,
    pub decision: Decision,
}

/// The bound a sequential certificate rests on, with every parameter needed to recompute it.
#[derive(Clone, Debug, PartialEq)]
pub enum Bound {
    /// [`mixture_lower_upper`]`(n_a, draws, alpha, prior)`.
    BetaBinomialMixture { prior: BetaPrior, alpha: f64 },
    /// [`staged_lower_upper`]`(n_a, draws, alpha, stages.len())`, `draws` being one of `stages`.
    StagedClopperPearson { stages: Vec<u64>, alpha: f64 },
}

/// The outcome of a sequential certification on one image.
#[derive(Clone, Debug, PartialEq)]
pub struct SequentialCertificate {
    /// `Some(c_hat)` when L_τ > 1/2, else `None` (abstain).
    pub predict: Option<u32>,
    /// σ·Φ⁻¹(L_τ), or 0 on abstention (as [`super::Certificate`] writes it).
    pub radius: f64,
    pub c_hat: u32,
    /// Estimation-round count of `c_hat` at the stop, S_τ.
    pub n_a: u64,
    /// Estimation draws used, τ.
    pub draws: u64,
    /// L_τ and U_τ.
    pub lower: f64,
    pub upper: f64,
    /// One per requested radius, in the order given.
    pub decisions: Vec<RadiusDecision>,
    pub bound: Bound,
    /// The run stopped after selection because ĉ was not the label (`stop_if_wrong`): no
    /// estimation draw was made, so the row can never count towards certified accuracy.
    pub stopped_wrong: bool,
}

/// Settings of [`certify_mixture`] and `Smooth::certify_sequential`.
#[derive(Clone, Debug, PartialEq)]
pub struct SequentialSettings {
    /// Selection draws (as CERTIFY's n0).
    pub n0: u64,
    /// Estimation-draw budget: the run stops here if some radius is still undecided.
    pub n_max: u64,
    /// Draws between two looks (and the model's batch size).
    pub batch: usize,
    pub alpha: f64,
    /// ℓ2 radii, in [0,1]-pixel units, at which a decision is wanted.
    pub radii: Vec<f64>,
    pub prior: BetaPrior,
}

impl SequentialSettings {
    pub fn validate(&self) -> Result<(), SequentialError> {
        check_common(self.n0, self.batch, self.alpha, &self.radii)?;
        if self.n_max == 0 {
            return Err(SequentialError::Settings("n_max must be at least 1".into()));
        }
        self.prior.validate()
    }
}

/// Settings of [`certify_staged`]: look only at the cumulative sample sizes `stages`.
#[derive(Clone, Debug, PartialEq)]
pub struct StagedSettings {
    pub n0: u64,
    /// Strictly increasing cumulative sample sizes, e.g. [1_000, 10_000, 100_000].
    pub stages: Vec<u64>,
    pub batch: usize,
    pub alpha: f64,
    pub radii: Vec<f64>,
}

impl StagedSettings {
    pub fn validate(&self) -> Result<(), SequentialError> {
        check_common(self.n0, self.batch, self.alpha, &self.radii)?;
        if self.stages.is_empty() || self.stages[0] == 0 {
            return Err(SequentialError::Settings(
                "stages must be non-empty and start at 1 or more".into(),
            ));
        }
        if self.stages.windows(2).any(|w| w[0] >= w[1]) {
            return Err(SequentialError::Settings(format!(
                "stages must be strictly increasing, got {:?}",
                self.stages
            )));
        }
        Ok(())
    }
}

fn check_common(n0: u64, batch: usize, alpha: f64, radii: &[f64]) -> Result<(), SequentialError> {
    if n0 == 0 {
        return Err(SequentialError::Settings("n0 must be at least 1".into()));
    }
    if batch == 0 {
        return Err(SequentialError::Settings("batch must be at least 1".into()));
    }
    if !(alpha > 0.0 && alpha < 1.0) {
        return Err(SequentialError::Settings(format!(
            "alpha must be in (0, 1), got {alpha}"
        )));
    }
    // With no radius the stopping rule would be met before any draw.
    if radii.is_empty() {
        return Err(SequentialError::Settings("radii must not be empty".into()));
    }
    if let Some(r) = radii.iter().find(|r| !(r.is_finite() && **r >= 0.0)) {
        return Err(SequentialError::Settings(format!(
            "radii must be finite and >= 0, got {r}"
        )));
    }
    Ok(())
}

fn check_sigma(sigma: f64) -> Result<(), SequentialError> {
    if !(sigma.is_finite() && sigma > 0.0) {
        return Err(SequentialError::Settings(format!(
            "sigma must be finite and > 0, got {sigma}"
        )));
    }
    Ok(())
}

/// Φ(r/σ) for every radius: the p_A that certifies r (Cohen et al. 2019, Theorem 1).
fn thresholds(sigma: f64, radii: &[f64]) -> Vec<f64> {
    // Normal::new(0, 1) cannot fail; NaN thresholds would only leave radii undecided.
    let phi = Normal::new(0.0, 1.0).ok();
    radii
        .iter()
        .map(|r| phi.as_ref().map_or(f64::NAN, |d| d.cdf(r / sigma)))
        .collect()
}

fn decide(lower: f64, upper: f64, threshold: f64) -> Decision {
    if lower > threshold {
        Decision::Certified
    } else if upper < threshold {
        Decision::Impossible
    } else {
        Decision::Undecided
    }
}

/// The decision of the mixture sequence at one threshold θ, without root-finding: θ lies outside
/// C_t exactly when M_t(θ) ≥ 1/α, and on the side of the MLE it lies on. This is what the driver
/// checks after every batch (4 evaluations instead of two bisections), and equals
/// `decide(L_t, U_t, θ)` except when θ is within the bisection tolerance (1e-14) of an end.
pub fn mixture_decide(
    successes: u64,
    trials: u64,
    alpha: f64,
    prior: BetaPrior,
    threshold: f64,
) -> Decision {
    if successes > trials
        || trials == 0
        || !(0.0..=1.0).contains(&threshold)
        || !(alpha > 0.0 && alpha < 1.0)
        || !prior.is_valid()
    {
        return Decision::Undecided;
    }
    let (s, f) = (successes as f64, (trials - successes) as f64);
    decide_at(
        log_mixture(successes, trials, prior),
        s,
        f,
        -alpha.ln(),
        threshold,
    )
}

fn decide_at(log_mix: f64, s: f64, f: f64, level: f64, threshold: f64) -> Decision {
    // Strict: a point with M_t = 1/α exactly is outside C_t but is the bound itself, and a
    // bound equal to θ does not certify θ (L > θ is required).
    if ln_m(log_mix, s, f, threshold) - level > 0.0 {
        if threshold * (s + f) < s {
            return Decision::Certified;
        }
        if threshold * (s + f) > s {
            return Decision::Impossible;
        }
    }
    Decision::Undecided
}

/// The certificate implied by a final (S, τ) and its bounds.
fn certificate(
    c_hat: u32,
    sigma: f64,
    (n_a, draws): (u64, u64),
    (lower, upper): (f64, f64),
    radii: &[f64],
    thresholds: &[f64],
    bound: Bound,
) -> SequentialCertificate {
    let decisions = radii
        .iter()
        .zip(thresholds)
        .map(|(&radius, &threshold)| RadiusDecision {
            radius,
            threshold,
            decision: decide(lower, upper, threshold),
        })
        .collect();
    let certified = lower > 0.5;
    SequentialCertificate {
        predict: certified.then_some(c_hat),
        radius: if certified {
            stats::radius(sigma, lower)
        } else {
            0.0
        },
        c_hat,
        n_a,
        draws,
        lower,
        upper,
        decisions,
        bound,
        stopped_wrong: false,
    }
}

/// The sequential certificate implied by a stored row: (L_τ, U_τ) =
/// [`mixture_lower_upper`]`(n_a, draws, alpha, prior)`, R = σ·Φ⁻¹(L_τ) when L_τ > 1/2 (else
/// abstain), and each radius r certified when L_τ > Φ(r/σ), impossible when U_τ < Φ(r/σ).
/// This is how a reviewer recomputes a certificate from (ĉ, n_A, τ, α, prior, σ, radii).
pub fn sequential_certificate_from_counts(
    c_hat: u32,
    n_a: u64,
    draws: u64,
    alpha: f64,
    prior: BetaPrior,
    sigma: f64,
    radii: &[f64],
) -> SequentialCertificate {
    certificate(
        c_hat,
        sigma,
        (n_a, draws),
        mixture_lower_upper(n_a, draws, alpha, prior),
        radii,
        &thresholds(sigma, radii),
        Bound::BetaBinomialMixture { prior, alpha },
    )
}

/// What a run stopped by `stop_if_wrong` right after selection reports: no estimation draw,
/// (L, U) = (0, 1), abstention and every radius undecided.
fn stopped_after_selection(
    c_hat: u32,
    sigma: f64,
    s: &SequentialSettings,
) -> SequentialCertificate {
    SequentialCertificate {
        stopped_wrong: true,
        ..sequential_certificate_from_counts(c_hat, 0, 0, s.alpha, s.prior, sigma, &s.radii)
    }
}

/// Draws `k` from `draw`, checking that it reports no more hits than draws.
fn take<E: From<SequentialError>>(
    draw: &mut impl FnMut(usize) -> Result<u64, E>,
    k: usize,
) -> Result<u64, E> {
    let hits = draw(k)?;
    if hits > k as u64 {
        return Err(SequentialError::SamplerOverflow {
            got: hits,
            asked: k,
        }
        .into());
    }
    Ok(hits)
}

/// Sequential CERTIFY with the beta-binomial mixture confidence sequence, given ĉ from separate
/// selection draws. `draw(k)` must make k fresh draws (independent of the selection ones) and
/// return how many were ĉ. After every batch of `s.batch` draws (the last one trimmed to
/// `s.n_max`), the run stops if every radius in `s.radii` is certified or impossible; the
/// certificate uses L_τ at that stop, which is valid because C_t covers p_A at all t at once.
pub fn certify_mixture<E, F>(
    c_hat: u32,
    sigma: f64,
    s: &SequentialSettings,
    draw: F,
) -> Result<SequentialCertificate, E>
where
    E: From<SequentialError>,
    F: FnMut(usize) -> Result<u64, E>,
{
    let batch = s.batch;
    certify_mixture_scheduled(c_hat, sigma, s, |_, _| batch, draw)
}

/// [`certify_mixture`] with the size of each next batch chosen by `next_batch(t, S)` (clamped
/// to [1, n_max − t]). A confidence sequence must stay valid whatever this schedule is, even
/// one that looks at the data: the tests use it to try adversarial schedules.
pub(crate) fn certify_mixture_scheduled<E, F, B>(
    c_hat: u32,
    sigma: f64,
    s: &SequentialSettings,
    mut next_batch: B,
    mut draw: F,
) -> Result<SequentialCertificate, E>
where
    E: From<SequentialError>,
    F: FnMut(usize) -> Result<u64, E>,
    B: FnMut(u64, u64) -> usize,
{
    s.validate()?;
    check_sigma(sigma)?;
    let thetas = thresholds(sigma, &s.radii);
    let level = -s.alpha.ln();
    let ln_beta_prior = ln_beta(s.prior.a, s.prior.b);
    let (mut hits, mut t) = (0u64, 0u64);
    while t < s.n_max {
        let room = usize::try_from(s.n_max - t).unwrap_or(usize::MAX);
        let k = next_batch(t, hits).clamp(1, room);
        hits += take(&mut draw, k)?;
        t += k as u64;
        let log_mix = log_mixture_given(hits, t, s.prior, ln_beta_prior);
        let (sf, ff) = (hits as f64, (t - hits) as f64);
        let all_decided = thetas
            .iter()
            .all(|&th| decide_at(log_mix, sf, ff, level, th) != Decision::Undecided);
        if all_decided {
            break;
        }
    }
    Ok(certificate(
        c_hat,
        sigma,
        (hits, t),
        mixture_lower_upper(hits, t, s.alpha, s.prior),
        &s.radii,
        &thetas,
        Bound::BetaBinomialMixture {
            prior: s.prior,
            alpha: s.alpha,
        },
    ))
}

/// One member of [`certify_mixture_shared`]: its ĉ, or `None` when it must stop after selection
/// (`stop_if_wrong` and ĉ ≠ label), with the class it picked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    Estimate(u32),
    StopWrong(u32),
}

/// [`certify_mixture`] for several members on shared draws (fused certification: one backbone
/// pass per batch for every member). `draw(k, active)` makes k fresh draws shared by all members
/// and returns, per member, how many were that member's ĉ; the entries of members not `active`
/// are ignored, so the caller may skip their forward pass. A member that has decided every
/// radius stops consuming draws while the others go on.
///
/// Every member follows the schedule it would follow alone (batches of `s.batch`, the last one
/// trimmed to `s.n_max`, a look after each): the schedule does not depend on the data, so all
/// running members are always at the same t and a member's certificate equals what
/// [`certify_mixture`] gives it alone on the same draws.
pub fn certify_mixture_shared<E, F>(
    starts: &[Start],
    sigma: f64,
    s: &SequentialSettings,
    mut draw: F,
) -> Result<Vec<SequentialCertificate>, E>
where
    E: From<SequentialError>,
    F: FnMut(usize, &[bool]) -> Result<Vec<u64>, E>,
{
    s.validate()?;
    check_sigma(sigma)?;
    let thetas = thresholds(sigma, &s.radii);
    let level = -s.alpha.ln();
    let ln_beta_prior = ln_beta(s.prior.a, s.prior.b);
    let mut active: Vec<bool> = starts
        .iter()
        .map(|st| matches!(st, Start::Estimate(_)))
        .collect();
    // (hits, draws) per member; a stopped member's stay where it stopped.
    let mut counts = vec![(0u64, 0u64); starts.len()];
    let mut t = 0u64;
    while t < s.n_max && active.iter().any(|&a| a) {
        let room = usize::try_from(s.n_max - t).unwrap_or(usize::MAX);
        let k = s.batch.min(room);
        let hits = draw(k, &active)?;
        if hits.len() != starts.len() {
            return Err(SequentialError::SamplerMembers {
                got: hits.len(),
                want: starts.len(),
            }
            .into());
        }
        t += k as u64;
        for ((running, &h), c) in active.iter_mut().zip(&hits).zip(&mut counts) {
            if !*running {
                continue;
            }
            if h > k as u64 {
                return Err(SequentialError::SamplerOverflow { got: h, asked: k }.into());
            }
            *c = (c.0 + h, t);
            let log_mix = log_mixture_given(c.0, t, s.prior, ln_beta_prior);
            let (sf, ff) = (c.0 as f64, (t - c.0) as f64);
            if thetas
                .iter()
                .all(|&th| decide_at(log_mix, sf, ff, level, th) != Decision::Undecided)
            {
                *running = false;
            }
        }
    }
    Ok(starts
        .iter()
        .zip(&counts)
        .map(|(st, &(hits, draws))| match *st {
            Start::StopWrong(c_hat) => stopped_after_selection(c_hat, sigma, s),
            Start::Estimate(c_hat) => sequential_certificate_from_counts(
                c_hat, hits, draws, s.alpha, s.prior, sigma, &s.radii,
            ),
        })
        .collect())
}

/// (L, U) of the staged Clopper–Pearson baseline at one stage: one-sided (1 − α/k) bounds for
/// `k` stages. The lower bounds then satisfy P(∃ stage: p < L) ≤ k·α/k = α (union bound), so
/// the certificate has level α whatever stage the run stops at; the upper bounds, used only
/// to stop early on impossible radii, hold jointly at level α on their own.
pub fn staged_lower_upper(successes: u64, trials: u64, alpha: f64, stages: usize) -> (f64, f64) {
    if successes > trials || trials == 0 || stages == 0 || !(alpha > 0.0 && alpha < 1.0) {
        return (f64::NAN, f64::NAN);
    }
    let a = alpha / stages as f64;
    (
        stats::clopper_pearson_lower(successes, trials, a),
        1.0 - stats::clopper_pearson_lower(trials - successes, trials, a),
    )
}

/// The staged Clopper–Pearson baseline: draw up to each stage's cumulative size (in batches of
/// `s.batch`), and stop at the first stage where every radius is certified or impossible by
/// [`staged_lower_upper`], or at the last stage.
pub fn certify_staged<E, F>(
    c_hat: u32,
    sigma: f64,
    s: &StagedSettings,
    mut draw: F,
) -> Result<SequentialCertificate, E>
where
    E: From<SequentialError>,
    F: FnMut(usize) -> Result<u64, E>,
{
    s.validate()?;
    check_sigma(sigma)?;
    let thetas = thresholds(sigma, &s.radii);
    let (mut hits, mut t) = (0u64, 0u64);
    let mut bounds = (0.0, 1.0);
    for &stage in &s.stages {
        while t < stage {
            let room = usize::try_from(stage - t).unwrap_or(usize::MAX);
            let k = s.batch.min(room);
            hits += take(&mut draw, k)?;
            t += k as u64;
        }
        bounds = staged_lower_upper(hits, t, s.alpha, s.stages.len());
        if thetas
            .iter()
            .all(|&th| decide(bounds.0, bounds.1, th) != Decision::Undecided)
        {
            break;
        }
    }
    Ok(certificate(
        c_hat,
        sigma,
        (hits, t),
        bounds,
        &s.radii,
        &thetas,
        Bound::StagedClopperPearson {
            stages: s.stages.clone(),
            alpha: s.alpha,
        },
    ))
}

#[cfg(test)]
#[path = "sequential_tests.rs"]
mod tests;
