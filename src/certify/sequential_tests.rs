//! The mixture bound against closed forms and an independent numeric integration, the drivers
//! on scripted samplers, and Monte Carlo error rates of both procedures (binomial batch counts
//! from a seeded ChaCha stream; no network).

use super::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Binomial, Distribution};

const SIGMA: f64 = 0.25;
const RADII: [f64; 4] = [0.25, 0.5, 0.75, 1.0];

fn phi(z: f64) -> f64 {
    Normal::new(0.0, 1.0).map(|d| d.cdf(z)).unwrap_or(f64::NAN)
}

fn settings(alpha: f64, n_max: u64, batch: usize) -> SequentialSettings {
    SequentialSettings {
        n0: 100,
        n_max,
        batch,
        alpha,
        radii: RADII.to_vec(),
        prior: BetaPrior::default(),
    }
}

// ---------------------------------------------------------------------------------------------
// The bound itself.

#[test]
fn one_draw_matches_the_closed_form() {
    // t = 1, S = 1, Jeffreys: B(3/2, 1/2)/B(1/2, 1/2) = 1/2, so M_1(p) = 1/(2p) and L = α/2.
    for alpha in [0.001, 0.05, 0.3] {
        let (l, u) = mixture_lower_upper(1, 1, alpha, BetaPrior::JEFFREYS);
        assert!((l - alpha / 2.0).abs() < 1e-13, "alpha {alpha}: L = {l}");
        assert_eq!(u, 1.0);
        let (l, u) = mixture_lower_upper(0, 1, alpha, BetaPrior::JEFFREYS);
        assert_eq!(l, 0.0);
        assert!((u - (1.0 - alpha / 2.0)).abs() < 1e-13, "U = {u}");
    }
}

#[test]
fn all_successes_match_the_closed_form() {
    // S = t, Jeffreys: B(1/2 + t, 1/2)/B(1/2, 1/2) = C(2t, t)/4^t, and M_t(p) = that / p^t,
    // so L = (α · C(2t, t)/4^t)^(1/t). The ratio is built as a running product, not from
    // log-gammas, so this checks ln_beta too.
    let alpha: f64 = 0.001;
    let mut ratio = 1.0f64;
    for t in 1..=60u64 {
        ratio *= (2 * t - 1) as f64 / (2 * t) as f64;
        let want = ((alpha * ratio).ln() / t as f64).exp();
        let (l, u) = mixture_lower_upper(t, t, alpha, BetaPrior::JEFFREYS);
        assert_eq!(u, 1.0);
        assert!(
            ((1.0 - l) - (1.0 - want)).abs() <= 1e-9 * (1.0 - want),
            "t={t}: L = {l}, want {want}"
        );
    }
}

/// ∫₀¹ q^S (1−q)^F dBeta(a, b)(q) by composite Simpson after q = sin²θ, which for a, b ≥ 1/2
/// leaves a smooth integrand 2·sin^(2(S+a)−1)θ·cos^(2(F+b)−1)θ / B(a, b) on [0, π/2].
fn mixture_by_quadrature(s: u64, f: u64, a: f64, b: f64, beta_ab: f64) -> f64 {
    let m = 20_000usize;
    let h = std::f64::consts::FRAC_PI_2 / m as f64;
    let (es, ec) = (2.0 * (s as f64 + a) - 1.0, 2.0 * (f as f64 + b) - 1.0);
    let fun = |th: f64| {
        let (sn, cs) = th.sin_cos();
        let v = |x: f64, e: f64| if e == 0.0 { 1.0 } else { x.powf(e) };
        2.0 * v(sn, es) * v(cs.max(0.0), ec) / beta_ab
    };
    let mut acc = fun(0.0) + fun(std::f64::consts::FRAC_PI_2);
    for i in 1..m {
        acc += fun(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
    }
    acc * h / 3.0
}

/// Bounds from the quadrature mixture by plain bisection to machine precision.
fn bounds_by_quadrature(s: u64, t: u64, alpha: f64, a: f64, b: f64, beta_ab: f64) -> (f64, f64) {
    let mix = mixture_by_quadrature(s, t - s, a, b, beta_ab);
    let excluded =
        |p: f64| mix / (p.powi(s as i32) * (1.0 - p).powi((t - s) as i32)) >= 1.0 / alpha;
    let mle = s as f64 / t as f64;
    let root = |mut out: f64, mut inside: f64| {
        for _ in 0..200 {
            let mid = 0.5 * (out + inside);
            if excluded(mid) {
                out = mid;
            } else {
                inside = mid;
            }
        }
        0.5 * (out + inside)
    };
    let l = if s == 0 { 0.0 } else { root(0.0, mle) };
    let u = if s == t { 1.0 } else { root(1.0, mle) };
    (l, u)
}

#[test]
fn matches_an_independent_numeric_integration_of_the_mixture() {
    let pi = std::f64::consts::PI;
    // Jeffreys (B = π) and uniform (B = 1).
    for (a, b, beta_ab) in [(0.5, 0.5, pi), (1.0, 1.0, 1.0)] {
        for (s, t) in [
            (0, 5),
            (1, 3),
            (3, 4),
            (7, 10),
            (10, 10),
            (15, 30),
            (36, 40),
            (59, 60),
        ] {
            for alpha in [0.001, 0.05] {
                let (l, u) = mixture_lower_upper(s, t, alpha, BetaPrior { a, b });
                let (lq, uq) = bounds_by_quadrature(s, t, alpha, a, b, beta_ab);
                assert!(
                    (l - lq).abs() < 1e-9 && (u - uq).abs() < 1e-9,
                    "Beta({a},{b}) S={s} t={t} alpha={alpha}: ({l}, {u}) vs quadrature ({lq}, {uq})"
                );
            }
        }
    }
}

#[test]
fn bounds_bracket_the_mle_and_grow_with_the_count() {
    for t in [1u64, 7, 100, 1_000, 100_000] {
        let step = (t / 50).max(1);
        let mut last = (-1.0, -1.0);
        let mut s = 0;
        while s <= t {
            let (l, u) = mixture_lower_upper(s, t, 0.001, BetaPrior::default());
            let mle = s as f64 / t as f64;
            assert!(
                0.0 <= l && l <= mle && mle <= u && u <= 1.0,
                "S={s} t={t}: {l} {u}"
            );
            assert!(l >= last.0 && u >= last.1, "S={s} t={t}: not monotone in S");
            last = (l, u);
            s += step;
        }
    }
}

#[test]
fn width_shrinks_with_the_number_of_draws() {
    for p in [0.5, 0.6, 0.9, 0.99, 0.999] {
        let mut last_width = f64::INFINITY;
        let mut last_gap = f64::INFINITY;
        for t in [1_000u64, 10_000, 100_000, 1_000_000] {
            let s = (p * t as f64).round() as u64;
            let (l, u) = mixture_lower_upper(s, t, 0.001, BetaPrior::default());
            assert!(
                u - l < last_width,
                "p={p} t={t}: width {} did not shrink",
                u - l
            );
            // What a radius depends on near 1 is 1 − L.
            assert!(1.0 - l < last_gap, "p={p} t={t}");
            last_width = u - l;
            last_gap = 1.0 - l;
        }
    }
}

#[test]
fn never_tighter_than_clopper_pearson_at_the_same_fixed_n() {
    // Valid at every t at once, the mixture must pay for it at any single t.
    for n in [1u64, 10, 100, 1_000, 10_000, 100_000] {
        let step = (n / 200).max(1);
        for (alpha, prior) in [0.001, 0.05]
            .into_iter()
            .flat_map(|a| [(a, BetaPrior::JEFFREYS), (a, BetaPrior::default())])
        {
            let mut s = 1;
            while s <= n {
                let (l, u) = mixture_lower_upper(s, n, alpha, prior);
                let cp = stats::clopper_pearson_lower(s, n, alpha);
                let cp_up = 1.0 - stats::clopper_pearson_lower(n - s, n, alpha);
                assert!(
                    l <= cp,
                    "S={s} n={n} alpha={alpha} {prior:?}: mixture {l} > CP {cp}"
                );
                assert!(
                    u >= cp_up,
                    "S={s} n={n} alpha={alpha} {prior:?}: mixture {u} < CP {cp_up}"
                );
                s += step;
            }
        }
    }
}

#[test]
fn degenerate_and_invalid_inputs() {
    assert_eq!(
        mixture_lower_upper(0, 0, 0.01, BetaPrior::JEFFREYS),
        (0.0, 1.0)
    );
    let nan = |(l, u): (f64, f64)| l.is_nan() && u.is_nan();
    assert!(nan(mixture_lower_upper(3, 2, 0.01, BetaPrior::JEFFREYS)));
    assert!(nan(mixture_lower_upper(1, 2, 0.0, BetaPrior::JEFFREYS)));
    assert!(nan(mixture_lower_upper(1, 2, 1.0, BetaPrior::JEFFREYS)));
    assert!(nan(mixture_lower_upper(
        1,
        2,
        0.01,
        BetaPrior { a: 0.0, b: 1.0 }
    )));
    assert!(log_mixture_martingale(1, 2, 1.5, BetaPrior::JEFFREYS).is_nan());
    // M_0 = 1: nothing has been seen.
    assert_eq!(log_mixture_martingale(0, 0, 0.3, BetaPrior::JEFFREYS), 0.0);
    assert_eq!(
        mixture_decide(1, 2, 0.01, BetaPrior { a: -1.0, b: 1.0 }, 0.5),
        Decision::Undecided
    );
}

#[test]
fn threshold_decisions_agree_with_the_bounds() {
    // The driver decides from M_t(θ) directly; a reviewer from (L, U). They must agree.
    let thetas: Vec<f64> = (1..=4).map(|k| phi(k as f64)).chain([0.5, 0.7]).collect();
    for t in [10u64, 1_000, 30_000] {
        let step = (t / 300).max(1);
        let mut s = 0;
        while s <= t {
            let (l, u) = mixture_lower_upper(s, t, 0.001, BetaPrior::default());
            for &th in &thetas {
                let direct = mixture_decide(s, t, 0.001, BetaPrior::default(), th);
                if (l - th).abs() > 1e-12 && (u - th).abs() > 1e-12 {
                    assert_eq!(direct, decide(l, u, th), "S={s} t={t} θ={th}");
                }
            }
            s += step;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Settings and drivers on scripted samplers.

#[test]
fn invalid_settings_are_rejected() {
    let ok = settings(0.001, 1_000, 100);
    assert!(ok.validate().is_ok());
    let bad = [
        SequentialSettings {
            n0: 0,
            ..ok.clone()
        },
        SequentialSettings {
            n_max: 0,
            ..ok.clone()
        },
        SequentialSettings {
            batch: 0,
            ..ok.clone()
        },
        SequentialSettings {
            alpha: 0.0,
            ..ok.clone()
        },
        SequentialSettings {
            alpha: 1.0,
            ..ok.clone()
        },
        SequentialSettings {
            alpha: f64::NAN,
            ..ok.clone()
        },
        SequentialSettings {
            radii: vec![],
            ..ok.clone()
        },
        SequentialSettings {
            radii: vec![0.25, -1.0],
            ..ok.clone()
        },
        SequentialSettings {
            radii: vec![f64::INFINITY],
            ..ok.clone()
        },
        SequentialSettings {
            prior: BetaPrior {
                a: 0.5,
                b: f64::NAN,
            },
            ..ok.clone()
        },
    ];
    for s in bad {
        assert!(s.validate().is_err(), "{s:?}");
        let r = certify_mixture(0, SIGMA, &s, |_| Ok::<u64, SequentialError>(0));
        assert!(matches!(r, Err(SequentialError::Settings(_))), "{s:?}");
    }
    let r = certify_mixture(0, 0.0, &ok, |_| Ok::<u64, SequentialError>(0));
    assert!(matches!(r, Err(SequentialError::Settings(_))));
    let staged = StagedSettings {
        n0: 100,
        stages: vec![1_000, 10_000],
        batch: 100,
        alpha: 0.001,
        radii: RADII.to_vec(),
    };
    assert!(staged.validate().is_ok());
    for stages in [vec![], vec![0, 10], vec![10, 10], vec![100, 10]] {
        let s = StagedSettings {
            stages,
            ..staged.clone()
        };
        assert!(s.validate().is_err(), "{s:?}");
    }
}

#[test]
fn a_sampler_reporting_more_hits_than_draws_is_an_error() {
    let r = certify_mixture(0, SIGMA, &settings(0.001, 1_000, 10), |k| {
        Ok::<u64, SequentialError>(k as u64 + 1)
    });
    assert!(matches!(
        r,
        Err(SequentialError::SamplerOverflow { got: 11, asked: 10 })
    ));
}

#[test]
fn stops_once_every_radius_is_decided_and_is_recomputable() {
    // Every draw is ĉ: radii up to 0.75 (θ = Φ(3) = 0.99865) certify once L_t > θ (some
    // thousands of draws), but r = 1 (θ = Φ(4) = 0.99997) can never be ruled out,
    // so with only r ≤ 0.75 requested the run stops early.
    let s = SequentialSettings {
        radii: vec![0.25, 0.5, 0.75],
        ..settings(0.001, 100_000, 100)
    };
    let mut asked = Vec::new();
    let cert = certify_mixture(7, SIGMA, &s, |k| {
        asked.push(k);
        Ok::<u64, SequentialError>(k as u64)
    })
    .expect("valid settings");
    assert!(cert.draws < 100_000 && cert.draws % 100 == 0, "{cert:?}");
    assert!(asked.iter().all(|&k| k == 100));
    assert_eq!(cert.n_a, cert.draws);
    assert_eq!(cert.predict, Some(7));
    assert!(cert
        .decisions
        .iter()
        .all(|d| d.decision == Decision::Certified));
    // One batch earlier it was not yet decided.
    let prev = mixture_lower_upper(
        cert.draws - 100,
        cert.draws - 100,
        0.001,
        BetaPrior::default(),
    );
    assert!(prev.0 <= phi(3.0));
    // Recompute from the reported numbers alone.
    let (l, u) = mixture_lower_upper(cert.n_a, cert.draws, 0.001, BetaPrior::default());
    assert_eq!((cert.lower, cert.upper), (l, u));
    assert!((cert.radius - SIGMA * stats::norm_ppf(l)).abs() < 1e-15);
    assert_eq!(
        cert.bound,
        Bound::BetaBinomialMixture {
            prior: BetaPrior::default(),
            alpha: 0.001
        }
    );
}

#[test]
fn runs_to_the_budget_when_a_radius_stays_undecided() {
    // p̂ = 0.8 exactly at every look, far from Φ(1) = 0.84 only relative to small t:
    // r = 0.25 needs U < 0.8413, which 1,050 draws cannot give.
    let mut t = 0u64;
    let mut hits = 0u64;
    let cert = certify_mixture(1, SIGMA, &settings(0.001, 1_050, 100), |k| {
        t += k as u64;
        let target = (t * 4) / 5;
        let h = target - hits;
        hits = target;
        Ok::<u64, SequentialError>(h)
    })
    .expect("valid settings");
    assert_eq!(cert.draws, 1_050);
    assert_eq!(cert.n_a, 840);
    assert_eq!(cert.decisions[0].decision, Decision::Undecided);
    assert!(cert.decisions[1..]
        .iter()
        .all(|d| d.decision == Decision::Impossible));
    assert_eq!(cert.predict, Some(1));
}

#[test]
fn abstains_when_the_lower_bound_is_at_most_one_half() {
    let cert = certify_mixture(2, SIGMA, &settings(0.001, 10_000, 500), |k| {
        Ok::<u64, SequentialError>(k as u64 / 2)
    })
    .expect("valid settings");
    // Every radius becomes impossible as soon as U < Φ(1).
    assert!(cert.draws < 10_000);
    assert!(cert
        .decisions
        .iter()
        .all(|d| d.decision == Decision::Impossible));
    assert_eq!(cert.predict, None);
    assert_eq!(cert.radius, 0.0);
}

#[test]
fn staged_stops_at_the_first_decided_stage() {
    let s = StagedSettings {
        n0: 100,
        stages: vec![1_000, 10_000, 100_000],
        batch: 400,
        alpha: 0.001,
        radii: vec![0.25, 0.5],
    };
    let mut asked = Vec::new();
    // p̂ = 0.99: Φ(2) = 0.977 is certified at 10,000 but not at 1,000 (CP at α/3).
    let cert = certify_staged(0, SIGMA, &s, |k| {
        asked.push(k);
        Ok::<u64, SequentialError>((k as u64 * 99) / 100)
    })
    .expect("valid settings");
    assert_eq!(cert.draws, 10_000);
    assert_eq!(asked.iter().sum::<usize>(), 10_000);
    // Batches never straddle a stage: 1,000 = 2·400 + 200.
    assert_eq!(&asked[..3], &[400, 400, 200]);
    assert!(cert
        .decisions
        .iter()
        .all(|d| d.decision == Decision::Certified));
    let (l, u) = staged_lower_upper(cert.n_a, 10_000, 0.001, 3);
    assert_eq!((cert.lower, cert.upper), (l, u));
    assert!((l - stats::clopper_pearson_lower(cert.n_a, 10_000, 0.001 / 3.0)).abs() < 1e-15);
}

// ---------------------------------------------------------------------------------------------
// `Smooth::certify_sequential` on a two-class linear model (P(f(x+δ) = 1) = Φ(m/σ) exactly).

struct TwoClassLinear {
    w: candle_core::Tensor,
    b: candle_core::Tensor,
}

impl crate::models::Classifier for TwoClassLinear {
    fn logits(&self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        x.flatten_from(1)?
            .matmul(&self.w.t()?)?
            .broadcast_add(&self.b)
    }
    fn num_classes(&self) -> usize {
        2
    }
}

/// Margin `margin` in favour of class 1 at the all-0.5 image (as in `certify::tests`).
fn model_with_margin(margin: f64) -> (TwoClassLinear, Vec<f32>) {
    use candle_core::{Device, Tensor};
    let d = 3072;
    let raw: Vec<f64> = (0..d).map(|j| (j as f64).sin() + 0.1).collect();
    let norm = raw.iter().map(|v| v * v).sum::<f64>().sqrt();
    let w: Vec<f64> = raw.iter().map(|v| v / norm).collect();
    let wx: f64 = w.iter().map(|v| v * 0.5).sum();
    let mut rows = vec![0f32; d];
    rows.extend(w.iter().map(|&v| v as f32));
    let w = Tensor::from_vec(rows, (2, d), &Device::Cpu).expect("shape");
    let b = Tensor::from_vec(vec![0f32, (margin - wx) as f32], 2, &Device::Cpu).expect("shape");
    (TwoClassLinear { w, b }, vec![0.5f32; d])
}

#[test]
fn smooth_sequential_draws_certify_noise_and_stops_early() {
    use super::super::{NoiseKey, Settings, Smooth};
    let (model, x) = model_with_margin(0.1);
    let smooth = Smooth::new(&model, SIGMA, candle_core::Device::Cpu);
    let key = NoiseKey {
        seed: 5,
        sigma: SIGMA,
        idx: 3,
    };
    // r = 0.1 puts the threshold at p_A = Φ(0.4) itself: undecided, so the run uses all
    // n_max draws, and they are CERTIFY's estimation draws (other batch size, same counts).
    let seq = SequentialSettings {
        n0: 100,
        n_max: 2_000,
        batch: 300,
        alpha: 0.001,
        radii: vec![0.1],
        prior: BetaPrior::default(),
    };
    let a = smooth
        .certify_sequential(&x, key, &seq)
        .expect("valid settings");
    let cohen = smooth
        .certify(
            &x,
            key,
            &Settings {
                n0: 100,
                n: 2_000,
                alpha: 0.001,
                batch: 500,
            },
        )
        .expect("valid settings");
    assert_eq!((a.c_hat, a.n_a, a.draws), (cohen.c_hat, cohen.n_a, 2_000));
    assert_eq!(a.decisions[0].decision, Decision::Undecided);
    // A clear margin (p_A = Φ(2)) certifies r = 0.25 long before the budget, below the exact
    // radius 0.5.
    let (model, x) = model_with_margin(0.5);
    let smooth = Smooth::new(&model, SIGMA, candle_core::Device::Cpu);
    let b = smooth
        .certify_sequential(
            &x,
            key,
            &SequentialSettings {
                n_max: 20_000,
                radii: vec![0.25],
                ..seq.clone()
            },
        )
        .expect("valid settings");
    assert!(b.draws < 2_000, "{b:?}");
    assert_eq!(b.predict, Some(1));
    assert_eq!(b.decisions[0].decision, Decision::Certified);
    assert!(b.radius > 0.25 && b.radius < 0.5, "{b:?}");
    let bad = SequentialSettings {
        radii: vec![],
        ..seq
    };
    assert!(matches!(
        smooth.certify_sequential(&x, key, &bad),
        Err(SequentialError::Settings(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Error rates by simulation: P(L_τ > p) ≤ α at the stopping time, whatever the stopping rule.

const STREAMS: usize = 20_000;

/// The size of the next batch given (t, S, true p).
type Schedule<'a> = &'a dyn Fn(u64, u64, f64) -> usize;

/// p on both sides of every threshold Φ(r/σ) (a tenth of the gap to 1 away), plus a spread.
fn p_grid() -> Vec<f64> {
    let mut ps = vec![0.5, 0.7, 0.9, 0.99];
    for r in RADII {
        let th = phi(r / SIGMA);
        ps.push(th - 0.1 * (1.0 - th));
        ps.push(th + 0.1 * (1.0 - th));
    }
    ps
}

/// The largest error fraction the test tolerates: α plus three binomial standard errors.
fn tolerance(alpha: f64, n: usize) -> f64 {
    alpha + 3.0 * (alpha * (1.0 - alpha) / n as f64).sqrt()
}

/// Fraction of `STREAMS` simulated runs at true p whose final lower bound exceeds p, with the
/// batch sizes of `schedule(t, S, p)`.
fn mixture_error_rate(p: f64, alpha: f64, n_max: u64, seed: u64, schedule: Schedule) -> (f64, f64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let s = settings(alpha, n_max, 200);
    let (mut wrong, mut draws) = (0usize, 0u64);
    for _ in 0..STREAMS {
        let cert = certify_mixture_scheduled(
            0,
            SIGMA,
            &s,
            |t, hits| schedule(t, hits, p),
            |k| {
                let d = Binomial::new(k as u64, p)
                    .map_err(|e| SequentialError::Settings(e.to_string()))?;
                Ok::<u64, SequentialError>(d.sample(&mut rng))
            },
        )
        .expect("valid settings");
        wrong += usize::from(cert.lower > p);
        draws += cert.draws;
    }
    (wrong as f64 / STREAMS as f64, draws as f64 / STREAMS as f64)
}

/// A look every 200 draws: 50 looks up to n_max = 10,000 (the adversarial schedules below
/// look far more often early on, where the sequence is loosest).
fn fixed_batch(_: u64, _: u64, _: f64) -> usize {
    200
}

#[test]
fn mixture_error_rate_is_within_alpha_near_every_threshold() {
    let alpha = 0.05;
    for (i, p) in p_grid().into_iter().enumerate() {
        let (rate, draws) = mixture_error_rate(p, alpha, 10_000, 100 + i as u64, &fixed_batch);
        println!("alpha {alpha} p {p:.7}: error rate {rate:.5}, mean draws {draws:.0}");
        assert!(
            rate <= tolerance(alpha, STREAMS),
            "p={p}: error rate {rate}"
        );
    }
}

#[test]
fn mixture_error_rate_is_within_a_small_alpha() {
    let alpha = 0.001;
    for (i, p) in [0.6, 0.83, 0.98, 0.999].into_iter().enumerate() {
        let (rate, draws) = mixture_error_rate(p, alpha, 10_000, 200 + i as u64, &fixed_batch);
        println!("alpha {alpha} p {p}: error rate {rate:.5}, mean draws {draws:.0}");
        assert!(
            rate <= tolerance(alpha, STREAMS),
            "p={p}: error rate {rate}"
        );
    }
}

#[test]
fn mixture_error_rate_ignores_adversarial_batch_schedules() {
    let alpha = 0.05;
    // One draw per look at first (where the sequence is loosest), then batches of a fifth of t.
    let ones_then_geometric = |t: u64, _: u64, _: f64| if t < 100 { 1 } else { (t / 5) as usize };
    // Look often while the running mean is above the truth (when an error is within reach),
    // jump ahead while it is below: a schedule that peeks at the data and at p itself.
    let peeking = |t: u64, hits: u64, p: f64| {
        if t == 0 || (hits as f64) > p * t as f64 {
            if t < 100 {
                1
            } else {
                (t / 5) as usize
            }
        } else {
            500
        }
    };
    let schedules: [(&str, Schedule); 2] = [
        ("ones-then-geometric", &ones_then_geometric),
        ("peeking", &peeking),
    ];
    for (j, (name, schedule)) in schedules.into_iter().enumerate() {
        for (i, p) in [0.85, 0.98, 0.9987].into_iter().enumerate() {
            let (rate, draws) =
                mixture_error_rate(p, alpha, 10_000, 300 + (10 * j + i) as u64, schedule);
            println!("{name} p {p}: error rate {rate:.5}, mean draws {draws:.0}");
            assert!(
                rate <= tolerance(alpha, STREAMS),
                "{name} p={p}: error rate {rate}"
            );
        }
    }
}

#[test]
fn staged_clopper_pearson_error_rate_is_within_alpha() {
    // Half the streams of the mixture tests: each look costs two Beta quantiles here.
    let (alpha, n) = (0.05, STREAMS / 2);
    let s = StagedSettings {
        n0: 100,
        stages: vec![100, 1_000, 10_000],
        batch: 10_000,
        alpha,
        radii: RADII.to_vec(),
    };
    for (i, p) in p_grid().into_iter().enumerate() {
        let mut rng = ChaCha8Rng::seed_from_u64(400 + i as u64);
        let mut wrong = 0usize;
        for _ in 0..n {
            let cert = certify_staged(0, SIGMA, &s, |k| {
                let d = Binomial::new(k as u64, p)
                    .map_err(|e| SequentialError::Settings(e.to_string()))?;
                Ok::<u64, SequentialError>(d.sample(&mut rng))
            })
            .expect("valid settings");
            wrong += usize::from(cert.lower > p);
        }
        let rate = wrong as f64 / n as f64;
        println!("staged CP p {p:.7}: error rate {rate:.5}");
        assert!(rate <= tolerance(alpha, n), "p={p}: error rate {rate}");
    }
}

#[test]
fn the_simulation_has_power_to_catch_naive_repeated_looks() {
    // Repeated one-sided Clopper–Pearson at full α after every batch of 100, stopping at the
    // first look where the bound clears p_A's threshold Φ(1): the classic optional-stopping
    // error. The harness must see it exceed the tolerance, or its passes would mean little.
    let (alpha, p) = (0.05, phi(1.0) - 0.01);
    let mut rng = ChaCha8Rng::seed_from_u64(500);
    let n = 2_000usize;
    let mut wrong = 0usize;
    for _ in 0..n {
        let (mut hits, mut t) = (0u64, 0u64);
        while t < 3_000 {
            hits += Binomial::new(100, p)
                .map(|d| d.sample(&mut rng))
                .unwrap_or(0);
            t += 100;
            if stats::clopper_pearson_lower(hits, t, alpha) > p {
                wrong += 1;
                break;
            }
        }
    }
    let rate = wrong as f64 / n as f64;
    println!("naive repeated CP: error rate {rate:.4}");
    assert!(rate > tolerance(alpha, n), "naive looks erred only {rate}");
}

// ---------------------------------------------------------------------------------------------
// Measurements (not tests): run with `-- --ignored --nocapture`.

/// Radius loss of each prior against one-sided Clopper–Pearson at the same fixed t (the table
/// in [`BetaPrior::DEFAULT_PRIOR`]'s docs), then 1 − L and the width U − L for the default.
#[test]
#[ignore]
fn prior_width_table() {
    let alpha = 0.001;
    let ps = [0.5, 0.6, 0.8, 0.9, 0.99, 0.999];
    let ts = [1_000u64, 10_000, 100_000];
    println!(
        "radius loss (CP radius − mixture radius) at σ = {SIGMA}, α = {alpha}, S = round(p·t)"
    );
    for prior in [
        BetaPrior::JEFFREYS,
        BetaPrior { a: 1.0, b: 1.0 },
        BetaPrior { a: 4.0, b: 0.5 },
        BetaPrior { a: 1.0, b: 0.5 },
        BetaPrior { a: 1.0, b: 0.25 },
        BetaPrior { a: 1.0, b: 0.1 },
        BetaPrior { a: 2.0, b: 0.25 },
    ] {
        for p in ps {
            let mut row = format!("Beta({},{}) p={p:<6}", prior.a, prior.b);
            for t in ts {
                let s = (p * t as f64).round() as u64;
                let (l, _) = mixture_lower_upper(s, t, alpha, prior);
                let cp = stats::clopper_pearson_lower(s, t, alpha);
                row += &format!(" {:.4}", SIGMA * (stats::norm_ppf(cp) - stats::norm_ppf(l)));
            }
            println!("{row}");
        }
    }
    println!("default prior: 1 − L (CP 1 − L) and U − L (CP, one-sided α each side)");
    for p in ps {
        let mut row = format!("p={p:<6}");
        for t in ts {
            let s = (p * t as f64).round() as u64;
            let (l, u) = mixture_lower_upper(s, t, alpha, BetaPrior::default());
            let cp = stats::clopper_pearson_lower(s, t, alpha);
            let cp_up = 1.0 - stats::clopper_pearson_lower(t - s, t, alpha);
            row += &format!(
                "  t={t}: {:.3e} ({:.3e}) {:.3e} ({:.3e})",
                1.0 - l,
                1.0 - cp,
                u - l,
                cp_up - cp
            );
        }
        println!("{row}");
    }
}

/// Expected draws and certified fractions: sequential mixture and staged CP against Cohen's
/// fixed n = 100,000 (all at α = 0.001, σ = 0.25, radii {0.25, 0.5, 0.75, 1.0}, batch 400).
#[test]
#[ignore]
fn savings_table() {
    let alpha = 0.001;
    let runs = 1_000usize;
    let seq = settings(alpha, 100_000, 400);
    let staged = StagedSettings {
        n0: 100,
        stages: vec![1_000, 10_000, 100_000],
        batch: 400,
        alpha,
        radii: RADII.to_vec(),
    };
    println!(
        "p      | method      | mean draws | mean radius | certified at r = 0.25 0.5 0.75 1.0"
    );
    for p in [0.6, 0.8, 0.9, 0.99, 0.999] {
        let mut rng = ChaCha8Rng::seed_from_u64(600);
        let mut sample = |k: usize| {
            Binomial::new(k as u64, p)
                .map(|d| d.sample(&mut rng))
                .map_err(|e| SequentialError::Settings(e.to_string()))
        };
        let mut acc = [(0u64, 0.0f64, [0usize; 4]); 3];
        for _ in 0..runs {
            let a = certify_mixture(0, SIGMA, &seq, &mut sample).expect("valid");
            let b = certify_staged(0, SIGMA, &staged, &mut sample).expect("valid");
            let n_a = sample(100_000).expect("valid");
            let c = super::super::certificate_from_counts(0, n_a, 100_000, alpha, SIGMA);
            for (slot, (draws, radius)) in acc.iter_mut().zip([
                (a.draws, a.radius),
                (b.draws, b.radius),
                (100_000, c.radius),
            ]) {
                slot.0 += draws;
                slot.1 += radius;
                for (k, r) in RADII.iter().enumerate() {
                    // Certified at r means R ≥ r (Cohen's approximate certified accuracy).
                    slot.2[k] += usize::from(radius >= *r);
                }
            }
        }
        for (name, (draws, radius, cert)) in ["mixture", "staged CP", "Cohen n=1e5"].iter().zip(acc)
        {
            let frac: Vec<String> = cert
                .iter()
                .map(|&c| format!("{:.3}", c as f64 / runs as f64))
                .collect();
            println!(
                "{p:<6} | {name:<11} | {:>10.0} | {:>11.4} | {}",
                draws as f64 / runs as f64,
                radius / runs as f64,
                frac.join(" ")
            );
        }
    }
}
