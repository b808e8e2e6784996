//! The statistics of Cohen et al.'s CERTIFY and PREDICT, as pure functions of counts.
//!
//! Quantiles come from `statrs` (regularised incomplete beta and its inverse, inverse normal CDF);
//! the tests check them against closed forms and against values computed to 20 digits with mpmath.

use statrs::distribution::{ContinuousCDF, Normal};
use statrs::function::beta::{beta_reg, inv_beta_reg, ln_beta};

/// One-sided (1 − α) Clopper–Pearson lower confidence bound on a binomial proportion:
/// the α-quantile of Beta(n_a, n − n_a + 1), or 0 when `n_a` = 0.
///
/// This is `proportion_confint(n_a, n, alpha=2*alpha, method="beta")[0]` in Cohen's `core.py`.
pub fn clopper_pearson_lower(n_a: u64, n: u64, alpha: f64) -> f64 {
    debug_assert!(n_a <= n && n > 0 && alpha > 0.0 && alpha < 1.0);
    if n_a == 0 {
        return 0.0;
    }
    let (a, b) = (n_a as f64, (n - n_a + 1) as f64);
    if 2 * n_a > n {
        // Near 1 the radius depends on 1 − p_A_lower, so solve for that tail directly
        // (I_x(a, b) = 1 − I_{1−x}(b, a)): its relative precision is kept, which 1 − x would lose.
        1.0 - beta_quantile(b, a, 1.0 - alpha)
    } else {
        beta_quantile(a, b, alpha)
    }
}

/// The `target`-quantile of Beta(a, b): statrs's inverse (accurate to ~1e-7 relative in the
/// tails) polished by Newton steps on the regularised incomplete beta function, which converge
/// quadratically to full double precision.
fn beta_quantile(a: f64, b: f64, target: f64) -> f64 {
    let mut x = inv_beta_reg(a, b, target);
    let ln_norm = ln_beta(a, b);
    for _ in 0..4 {
        if !(x > 0.0 && x < 1.0) {
            break;
        }
        let pdf = ((a - 1.0) * x.ln() + (b - 1.0) * (-x).ln_1p() - ln_norm).exp();
        if !(pdf.is_finite() && pdf > 0.0) {
            break;
        }
        let next = x - (beta_reg(a, b, x) - target) / pdf;
        if !(next > 0.0 && next < 1.0) || next == x {
            break;
        }
        x = next;
    }
    x
}

/// Φ⁻¹(p) for the standard normal distribution.
pub fn norm_ppf(p: f64) -> f64 {
    // Normal::new(0, 1) cannot fail; the fallback keeps this function total anyway.
    Normal::new(0.0, 1.0)
        .map(|d| d.inverse_cdf(p))
        .unwrap_or(f64::NAN)
}

/// Certified ℓ2 radius σ·Φ⁻¹(p_A_lower) (Cohen et al. 2019, Theorem 1 with p_B = 1 − p_A).
pub fn radius(sigma: f64, p_a_lower: f64) -> f64 {
    sigma * norm_ppf(p_a_lower)
}

/// Two-sided exact binomial test of H0: p = 1/2 for `k` successes in `m` trials (scipy's
/// `binom_test(k, m, 0.5)`): the probability, under H0, of an outcome at least as far from m/2.
pub fn binom_test_half(k: u64, m: u64) -> f64 {
    if m == 0 {
        return 1.0;
    }
    let hi = k.max(m - k);
    // P(X ≥ hi) for X ~ Bin(m, 1/2) equals I_{1/2}(hi, m − hi + 1); by symmetry the two tails are equal.
    let upper = if hi == 0 {
        1.0
    } else {
        beta_reg(hi as f64, (m - hi + 1) as f64, 0.5)
    };
    // When k = m/2 both tails contain the centre and the p-value is 1.
    (2.0 * upper).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1e-300)
    }

    #[test]
    fn all_successes_matches_the_closed_form_alpha_to_the_one_over_n() {
        // Beta(n, 1) has CDF x^n, so its α-quantile is α^(1/n).
        for &n in &[1u64, 10, 100, 1_000, 100_000] {
            for &alpha in &[0.001f64, 0.01, 0.05] {
                // 1 − α^(1/n), computed without cancellation.
                let gap = -(alpha.ln() / n as f64).exp_m1();
                let got = clopper_pearson_lower(n, n, alpha);
                // What the radius depends on is the gap to 1: check it to 1e-9 relative (a radius
                // error far below 1e-12; statrs's beta_reg limits the last digits).
                assert!(
                    close(1.0 - got, gap, 1e-9),
                    "n={n} alpha={alpha}: 1 - {got} vs {gap}"
                );
            }
        }
    }

    #[test]
    fn one_success_matches_the_closed_form() {
        // Beta(1, n) has CDF 1 − (1 − x)^n, so its α-quantile is 1 − (1 − α)^(1/n).
        for &n in &[10u64, 1_000, 100_000] {
            let want = -((-0.001f64).ln_1p() / n as f64).exp_m1();
            let got = clopper_pearson_lower(1, n, 0.001);
            assert!(close(got, want, 1e-9), "n={n}: {got} vs {want}");
        }
    }

    /// Reference values: mpmath at 30 digits, bisection on the binomial tail
    /// P(Bin(n, p) ≥ n_a) = α (script in the commit that added this test):
    /// ```python
    /// def cp_lower(na, n, alpha):  # bisection on p, 110 halvings
    ///     lo, hi = 0, 1
    ///     while ...: mid = (lo+hi)/2; (hi if tail(na, n, mid) > alpha else lo) = mid
    /// ```
    #[test]
    fn matches_high_precision_reference_values() {
        let cases = [
            (
                100_000u64,
                100_000u64,
                0.001,
                0.999_930_924_833_009_4,
                3.811_456_563_389_952,
            ),
            (
                99_990,
                100_000,
                0.001,
                0.999_758_677_343_591_2,
                3.490_207_680_146_649,
            ),
            (
                99_900,
                100_000,
                0.001,
                0.998_650_992_446_753_1,
                3.000_200_987_668_372,
            ),
            (
                50_500,
                100_000,
                0.001,
                0.500_108_951_739_587_8,
                0.000_273_101_514_415_967_5,
            ),
            (
                990,
                1_000,
                0.001,
                0.976_036_187_155_311_4,
                1.978_009_582_141_199,
            ),
            (
                500,
                1_000,
                0.001,
                0.450_771_053_984_782_4,
                -0.123_713_518_129_680_7,
            ),
            (
                60,
                100,
                0.05,
                0.512_975_820_253_894_4,
                0.032_531_294_921_923_37,
            ),
            (
                1,
                10,
                0.001,
                0.000_100_045_028_520_678_6,
                -3.718_902_757_452_309,
            ),
        ];
        for (na, n, alpha, p_want, z_want) in cases {
            let p = clopper_pearson_lower(na, n, alpha);
            assert!(
                close(p, p_want, 1e-12),
                "pA_lower({na},{n},{alpha}) = {p}, want {p_want}"
            );
            let z = norm_ppf(p);
            // Near p = 1/2 the quantile is ill-conditioned, so compare absolutely there.
            assert!(
                (z - z_want).abs() < 1e-7 * z_want.abs().max(1e-2),
                "z({na},{n}) = {z}, want {z_want}"
            );
        }
    }

    #[test]
    fn radius_is_sigma_times_the_normal_quantile() {
        assert!((radius(0.5, 0.5)).abs() < 1e-15);
        assert!((radius(0.25, 0.975) - 0.25 * 1.959_963_984_540_054).abs() < 1e-12);
    }

    #[test]
    fn binomial_test_matches_scipy() {
        // scipy.stats.binom_test values.
        assert!((binom_test_half(5, 10) - 1.0).abs() < 1e-12);
        assert!((binom_test_half(9, 10) - 0.021_484_375).abs() < 1e-12);
        assert!((binom_test_half(1, 10) - 0.021_484_375).abs() < 1e-12);
        assert!((binom_test_half(10, 10) - 0.001_953_125).abs() < 1e-12);
        assert!((binom_test_half(0, 0) - 1.0).abs() < 1e-12);
        // 60 of 100: 2·P(X ≥ 60) = 0.056887933640...
        assert!((binom_test_half(60, 100) - 0.056_887_933_640_980_79).abs() < 1e-10);
    }
}
