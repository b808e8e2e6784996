//! The numbers of a report, from per-image certification outcomes.
//!
//! Definitions (Cohen et al. 2019, §4): an image is *certified at radius r* when the smoothed
//! classifier's prediction is correct and its certified radius is ≥ r; abstentions and wrong
//! predictions never count. Certified accuracy at r is the fraction of the certified test images
//! that are certified at r ("approximate certified accuracy", since each certificate holds with
//! probability ≥ 1 − α). The average certified radius (ACR) is the mean over images of the
//! radius of correct predictions, 0 for the rest.

use rand::{RngExt, SeedableRng};
use statrs::distribution::{Binomial, DiscreteCDF};

use crate::store::CertRow;

/// Whether one image counts as certified at radius `r`.
pub fn certified_at(row: &CertRow, r: f64) -> bool {
    row.correct && row.predict >= 0 && row.radius >= r
}

/// Fraction of `rows` certified at `r` (0 for no rows).
pub fn certified_accuracy(rows: &[CertRow], r: f64) -> f64 {
    if rows.is_empty() {
        return 0.0;
    }
    rows.iter().filter(|x| certified_at(x, r)).count() as f64 / rows.len() as f64
}

/// Average certified radius (0 for no rows).
pub fn acr(rows: &[CertRow]) -> f64 {
    if rows.is_empty() {
        return 0.0;
    }
    rows.iter()
        .filter(|x| certified_at(x, 0.0))
        .map(|x| x.radius)
        .sum::<f64>()
        / rows.len() as f64
}

/// The certified-accuracy curve as the corners of a step function: (0, acc(0)), then at each
/// distinct radius of a certified image the value just after it, ending at the largest radius.
pub fn curve(rows: &[CertRow]) -> Vec<(f64, f64)> {
    if rows.is_empty() {
        return Vec::new();
    }
    let n = rows.len() as f64;
    let mut radii: Vec<f64> = rows
        .iter()
        .filter(|x| certified_at(x, 0.0))
        .map(|x| x.radius)
        .collect();
    radii.sort_by(f64::total_cmp);
    let mut points = vec![(0.0, radii.len() as f64 / n)];
    // acc(r) for r just above radii[i] is the count of radii > radii[i].
    let mut i = 0;
    while i < radii.len() {
        let r = radii[i];
        while i < radii.len() && radii[i] == r {
            i += 1;
        }
        points.push((r, (radii.len() - i) as f64 / n));
    }
    points
}

/// A paired comparison of two methods on the same test images at one radius.
#[derive(Clone, Debug, PartialEq)]
pub struct PairedDiff {
    /// Images both methods certified (the intersection of their index sets).
    pub n_images: usize,
    /// Certified accuracy of A and of B over those images.
    pub acc_a: f64,
    pub acc_b: f64,
    /// `acc_a − acc_b`.
    pub diff: f64,
    /// 95 % paired-bootstrap percentile interval of `diff`.
    pub ci_low: f64,
    pub ci_high: f64,
    /// Images certified by A but not B, and by B but not A (McNemar's discordant pairs).
    pub only_a: usize,
    pub only_b: usize,
    /// Exact two-sided McNemar p-value (binomial test on the discordant pairs).
    pub p_value: f64,
}

/// Bootstrap resamples per interval.
pub const BOOTSTRAP_RESAMPLES: usize = 10_000;

/// Compares A and B at radius `r` over the images both certified.
///
/// Why paired: both methods certify the same images, so per-image outcomes are correlated and
/// the interval of a difference is much narrower than two independent intervals suggest. The
/// bootstrap resamples images with replacement (each image's Monte Carlo outcome is part of
/// what is resampled, so the interval covers test-set sampling and certification noise
/// together); McNemar's exact test asks whether the discordant images split evenly. The
/// bootstrap is seeded, so the same results always give the same interval.
pub fn paired(a: &[CertRow], b: &[CertRow], r: f64, seed: u64) -> Option<PairedDiff> {
    let by_idx: std::collections::HashMap<u64, &CertRow> = b.iter().map(|x| (x.idx, x)).collect();
    let pairs: Vec<(bool, bool)> = a
        .iter()
        .filter_map(|x| {
            by_idx
                .get(&x.idx)
                .map(|y| (certified_at(x, r), certified_at(y, r)))
        })
        .collect();
    if pairs.is_empty() {
        return None;
    }
    let n = pairs.len();
    let d: Vec<f64> = pairs
        .iter()
        .map(|&(p, q)| f64::from(u8::from(p)) - f64::from(u8::from(q)))
        .collect();
    let diff = d.iter().sum::<f64>() / n as f64;
    let mut rng = rand_chacha::ChaCha12Rng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| (0..n).map(|_| d[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let q = |p: f64| means[(p * (BOOTSTRAP_RESAMPLES - 1) as f64).round() as usize];
    let only_a = pairs.iter().filter(|&&(p, q)| p && !q).count();
    let only_b = pairs.iter().filter(|&&(p, q)| !p && q).count();
    let count = |f: fn(&(bool, bool)) -> bool| pairs.iter().filter(|p| f(p)).count() as f64;
    Some(PairedDiff {
        n_images: n,
        acc_a: count(|p| p.0) / n as f64,
        acc_b: count(|p| p.1) / n as f64,
        diff,
        ci_low: q(0.025),
        ci_high: q(0.975),
        only_a,
        only_b,
        p_value: mcnemar_exact(only_a, only_b),
    })
}

/// Two-sided exact McNemar p-value: 2·P(X ≤ min(b, c)) for X ~ Bin(b + c, ½), capped at 1.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let m = (b + c) as u64;
    if m == 0 {
        return 1.0;
    }
    let Ok(bin) = Binomial::new(0.5, m) else {
        return 1.0;
    };
    (2.0 * bin.cdf(b.min(c) as u64)).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn row(idx: u64, correct: bool, predict: i64, radius: f64) -> CertRow {
        CertRow {
            idx,
            label: 0,
            predict,
            radius,
            correct,
            c_hat: 0,
            n_a: 0,
            n: 0,
            n0: 0,
            alpha: 0.001,
            sigma: 0.25,
            seconds: 0.0,
            sequential: None,
        }
    }

    /// Ten images with known outcomes: 6 correct with radii 0.1, 0.2, 0.2, 0.5, 0.9, 1.3; one
    /// wrong prediction with a large radius; one abstention; two more wrong.
    fn ten() -> Vec<CertRow> {
        vec![
            row(0, true, 0, 0.1),
            row(1, true, 0, 0.2),
            row(2, true, 0, 0.2),
            row(3, true, 0, 0.5),
            row(4, true, 0, 0.9),
            row(5, true, 0, 1.3),
            row(6, false, 3, 2.0),
            row(7, false, -1, 0.0),
            row(8, false, 1, 0.3),
            row(9, false, 2, 0.4),
        ]
    }

    #[test]
    fn certified_accuracy_counts_only_correct_predictions_with_enough_radius() {
        let rows = ten();
        assert_eq!(certified_accuracy(&rows, 0.0), 0.6);
        assert_eq!(certified_accuracy(&rows, 0.2), 0.5);
        assert_eq!(certified_accuracy(&rows, 0.25), 0.3);
        assert_eq!(certified_accuracy(&rows, 1.0), 0.1);
        // The wrong prediction with radius 2.0 never counts.
        assert_eq!(certified_accuracy(&rows, 1.5), 0.0);
        assert_eq!(certified_accuracy(&[], 0.0), 0.0);
    }

    #[test]
    fn acr_averages_correct_radii_over_all_images() {
        let expected = (0.1 + 0.2 + 0.2 + 0.5 + 0.9 + 1.3) / 10.0;
        assert!((acr(&ten()) - expected).abs() < 1e-15);
    }

    #[test]
    fn curve_steps_down_at_each_distinct_radius() {
        let c = curve(&ten());
        assert_eq!(
            c,
            vec![
                (0.0, 0.6),
                (0.1, 0.5),
                (0.2, 0.3),
                (0.5, 0.2),
                (0.9, 0.1),
                (1.3, 0.0)
            ]
        );
        // Every corner agrees with the direct count just after it.
        for &(r, v) in &c[1..] {
            assert_eq!(v, certified_accuracy(&ten(), r + 1e-9));
        }
    }

    #[test]
    fn paired_difference_and_mcnemar_on_a_known_split() {
        // A certifies images 0..8 at r = 0, B certifies 4..10 (of 10): diff = 0.8 − 0.6.
        let a: Vec<CertRow> = (0..10).map(|i| row(i, i < 8, 0, 0.5)).collect();
        let b: Vec<CertRow> = (0..10).map(|i| row(i, i >= 4, 0, 0.5)).collect();
        let p = paired(&a, &b, 0.0, 7).expect("overlapping images");
        assert_eq!(p.n_images, 10);
        assert!((p.diff - 0.2).abs() < 1e-12);
        assert_eq!((p.acc_a, p.acc_b), (0.8, 0.6));
        assert_eq!((p.only_a, p.only_b), (4, 2));
        // 2·P(Bin(6, ½) ≤ 2) = 2·(1 + 6 + 15)/64.
        assert!((p.p_value - 44.0 / 64.0).abs() < 1e-12);
        assert!(p.ci_low <= p.diff && p.diff <= p.ci_high);
        assert!(p.ci_low >= -1.0 && p.ci_high <= 1.0);
        // Seeded: the same inputs give the same interval.
        assert_eq!(paired(&a, &b, 0.0, 7), Some(p));
    }

    #[test]
    fn paired_uses_only_images_both_methods_certified() {
        let a: Vec<CertRow> = (0..10).map(|i| row(i, true, 0, 1.0)).collect();
        let b: Vec<CertRow> = (5..20).map(|i| row(i, false, 1, 0.0)).collect();
        let p = paired(&a, &b, 0.5, 0).expect("overlap 5..10");
        assert_eq!(p.n_images, 5);
        assert_eq!(p.diff, 1.0);
        // All resamples of an all-ones difference are 1.
        assert_eq!((p.ci_low, p.ci_high), (1.0, 1.0));
        assert!(paired(&a, &[], 0.0, 0).is_none());
    }

    #[test]
    fn identical_methods_have_a_zero_difference_and_p_one() {
        let p = paired(&ten(), &ten(), 0.25, 1).expect("same images");
        assert_eq!(
            (p.diff, p.ci_low, p.ci_high, p.p_value),
            (0.0, 0.0, 0.0, 1.0)
        );
    }
}
