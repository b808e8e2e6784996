//! The engine against closed forms: for a two-class linear base classifier the smoothed
//! classifier is known exactly: P(f(x+δ) = 1) = Φ(m/σ) with margin m = (w·x + b)/‖w‖, and
//! its exact certified radius is |m|.

use super::*;
use candle_core::{Device, Tensor};
use statrs::distribution::{ContinuousCDF, Normal};

/// logits = x·Wᵀ + b on flattened [0,1] pixels (the `linear` arch, built in place).
struct TwoClassLinear {
    w: Tensor,
    b: Tensor,
}

impl Classifier for TwoClassLinear {
    fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.flatten_from(1)?;
        x.matmul(&self.w.t()?)?.broadcast_add(&self.b)
    }
    fn num_classes(&self) -> usize {
        2
    }
}

/// A model whose margin at the all-0.5 image is `margin` in favour of class 1.
fn model_with_margin(margin: f64) -> (TwoClassLinear, Vec<f32>) {
    let d = 3072;
    // A fixed, non-trivial direction: w_j = sin(j) + 0.1, unit-normalised.
    let raw: Vec<f64> = (0..d).map(|j| (j as f64).sin() + 0.1).collect();
    let norm = raw.iter().map(|v| v * v).sum::<f64>().sqrt();
    let w: Vec<f64> = raw.iter().map(|v| v / norm).collect();
    let x = vec![0.5f32; d];
    let wx: f64 = w.iter().map(|v| v * 0.5).sum();
    let b = margin - wx;
    let mut rows = vec![0f32; d];
    rows.extend(w.iter().map(|&v| v as f32));
    let w = Tensor::from_vec(rows, (2, d), &Device::Cpu).unwrap();
    let b = Tensor::from_vec(vec![0f32, b as f32], 2, &Device::Cpu).unwrap();
    (TwoClassLinear { w, b }, x)
}

fn phi(z: f64) -> f64 {
    Normal::new(0.0, 1.0).unwrap().cdf(z)
}

#[test]
fn monte_carlo_frequency_matches_the_exact_smoothed_probability() {
    let (model, x) = model_with_margin(0.3);
    let sigma = 0.25;
    let smooth = Smooth::new(&model, sigma, Device::Cpu);
    let s = Settings {
        n0: 100,
        n: 20_000,
        alpha: 0.001,
        batch: 1000,
    };
    let cert = smooth
        .certify(
            &x,
            NoiseKey {
                seed: 1,
                sigma,
                idx: 0,
            },
            &s,
        )
        .unwrap();
    let p = phi(0.3 / sigma);
    let freq = cert.n_a as f64 / cert.n as f64;
    let se = (p * (1.0 - p) / cert.n as f64).sqrt();
    assert_eq!(cert.c_hat, 1);
    assert!(
        (freq - p).abs() < 5.0 * se,
        "freq {freq} vs exact {p} (se {se})"
    );
}

#[test]
fn certified_radius_never_exceeds_the_exact_radius_and_approaches_it() {
    let margin = 0.3;
    let (model, x) = model_with_margin(margin);
    let sigma = 0.25;
    let smooth = Smooth::new(&model, sigma, Device::Cpu);
    let mut last = 0.0;
    for (i, n) in [1_000u64, 10_000, 100_000].into_iter().enumerate() {
        let s = Settings {
            n0: 100,
            n,
            alpha: 0.001,
            batch: 2000,
        };
        let cert = smooth
            .certify(
                &x,
                NoiseKey {
                    seed: 3,
                    sigma,
                    idx: i as u64,
                },
                &s,
            )
            .unwrap();
        assert_eq!(cert.predict, Some(1));
        assert!(
            cert.radius < margin,
            "n={n}: radius {} exceeds the exact {margin}",
            cert.radius
        );
        assert!(
            cert.radius > last,
            "n={n}: radius {} did not grow from {last}",
            cert.radius
        );
        last = cert.radius;
    }
    // With n = 100,000 the Clopper–Pearson slack at α = 0.001 costs about 0.01 in radius here.
    assert!(
        margin - last < 0.02,
        "radius {last} is still far from {margin}"
    );
}

#[test]
fn abstains_when_the_classes_are_balanced() {
    let (model, x) = model_with_margin(0.0);
    let smooth = Smooth::new(&model, 0.5, Device::Cpu);
    let s = Settings {
        n0: 100,
        n: 2_000,
        alpha: 0.001,
        batch: 500,
    };
    let cert = smooth
        .certify(
            &x,
            NoiseKey {
                seed: 0,
                sigma: 0.5,
                idx: 0,
            },
            &s,
        )
        .unwrap();
    assert_eq!(cert.predict, None);
    assert_eq!(cert.radius, 0.0);
    let pred = smooth
        .predict(
            &x,
            NoiseKey {
                seed: 0,
                sigma: 0.5,
                idx: 0,
            },
            2_000,
            0.001,
            500,
        )
        .unwrap();
    assert_eq!(pred.predict, None);
}

#[test]
fn predict_returns_the_clear_winner() {
    let (model, x) = model_with_margin(-0.4);
    let smooth = Smooth::new(&model, 0.25, Device::Cpu);
    let pred = smooth
        .predict(
            &x,
            NoiseKey {
                seed: 0,
                sigma: 0.25,
                idx: 5,
            },
            1_000,
            0.001,
            250,
        )
        .unwrap();
    assert_eq!(pred.predict, Some(0));
    assert_eq!(pred.n_a + pred.n_b, 1_000);
}

#[test]
fn results_do_not_depend_on_the_batch_size() {
    let (model, x) = model_with_margin(0.1);
    let smooth = Smooth::new(&model, 0.5, Device::Cpu);
    let key = NoiseKey {
        seed: 9,
        sigma: 0.5,
        idx: 17,
    };
    let a = smooth
        .certify(
            &x,
            key,
            &Settings {
                n0: 50,
                n: 3_000,
                alpha: 0.01,
                batch: 3_000,
            },
        )
        .unwrap();
    let b = smooth
        .certify(
            &x,
            key,
            &Settings {
                n0: 50,
                n: 3_000,
                alpha: 0.01,
                batch: 7 * 37,
            },
        )
        .unwrap();
    assert_eq!(a, b);
}

/// Noise drawn on a second thread while the model classifies (a GPU's default) gives exactly the
/// counts of drawing it in line, whatever the batch split, for CERTIFY and PREDICT.
#[test]
fn noise_drawn_ahead_on_a_second_thread_gives_the_same_certificates() {
    let (model, x) = model_with_margin(0.05);
    let key = NoiseKey {
        seed: 3,
        sigma: 0.5,
        idx: 5,
    };
    let inline = Smooth::new(&model, 0.5, Device::Cpu).with_pipeline(false);
    let ahead = Smooth::new(&model, 0.5, Device::Cpu).with_pipeline(true);
    for batch in [2_000, 7 * 37, 5_000, 1] {
        let s = Settings {
            n0: 50,
            n: 2_000,
            alpha: 0.01,
            batch,
        };
        let want = inline.certify(&x, key, &s).unwrap();
        assert_eq!(want, ahead.certify(&x, key, &s).unwrap(), "batch {batch}");
        assert!(
            want.n_a > 0 && want.n_a < 2_000,
            "a margin that splits the draws"
        );
        assert_eq!(
            inline.predict(&x, key, 500, 0.01, batch).unwrap(),
            ahead.predict(&x, key, 500, 0.01, batch).unwrap()
        );
    }
}

/// A model that fails on its third batch.
struct FailsOnThirdBatch {
    inner: TwoClassLinear,
    calls: std::sync::atomic::AtomicUsize,
}

impl Classifier for FailsOnThirdBatch {
    fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 2 {
            candle_core::bail!("out of memory (planted)");
        }
        self.inner.logits(x)
    }
    fn num_classes(&self) -> usize {
        2
    }
}

/// The device's error comes back, and the noise thread, blocked on a batch nobody will take,
/// stops instead of hanging the certification.
#[test]
fn a_model_error_stops_the_noise_thread_and_is_returned() {
    let (inner, x) = model_with_margin(0.05);
    let model = FailsOnThirdBatch {
        inner,
        calls: Default::default(),
    };
    let key = NoiseKey {
        seed: 3,
        sigma: 0.5,
        idx: 5,
    };
    let s = Settings {
        n0: 10,
        n: 10_000,
        alpha: 0.01,
        batch: 100,
    };
    let err = Smooth::new(&model, 0.5, Device::Cpu)
        .with_pipeline(true)
        .certify(&x, key, &s)
        .expect_err("the third batch fails");
    assert!(err.to_string().contains("out of memory (planted)"), "{err}");
}

#[test]
fn certificate_from_counts_recomputes_cohen_radius() {
    // 990 of 1000 at α = 0.001, σ = 0.5: 0.5 · Φ⁻¹(0.976036187155311) = 0.98900479107...
    let c = certificate_from_counts(3, 990, 1000, 0.001, 0.5);
    assert_eq!(c.predict, Some(3));
    assert!((c.radius - 0.5 * 1.978_009_582_141_199).abs() < 1e-9);
    let abstain = certificate_from_counts(3, 500, 1000, 0.001, 0.5);
    assert_eq!(abstain.predict, None);
    assert_eq!(abstain.radius, 0.0);
}

#[test]
fn invalid_settings_are_rejected() {
    for s in [
        Settings {
            n0: 100,
            n: 100,
            ..Settings::default()
        },
        Settings {
            n0: 0,
            ..Settings::default()
        },
        Settings {
            alpha: 1.0,
            ..Settings::default()
        },
        Settings {
            alpha: 0.0,
            ..Settings::default()
        },
        Settings {
            batch: 0,
            ..Settings::default()
        },
    ] {
        assert!(s.validate().is_err(), "{s:?}");
    }
}

/// Two linear models as one set: fused certification must equal certifying each alone.
struct Pair<'a>(&'a TwoClassLinear, &'a TwoClassLinear);

impl ClassifierSet for Pair<'_> {
    fn members(&self) -> usize {
        2
    }
    fn num_classes(&self) -> usize {
        2
    }
    fn logits_all(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        Ok(vec![self.0.logits(x)?, self.1.logits(x)?])
    }
}

#[test]
fn fused_certification_equals_separate_runs() {
    let (a, x) = model_with_margin(0.2);
    let (b, _) = model_with_margin(-0.1);
    let s = Settings {
        n0: 50,
        n: 2_000,
        alpha: 0.001,
        batch: 500,
    };
    let key = NoiseKey {
        seed: 4,
        sigma: 0.25,
        idx: 8,
    };
    let pair = Pair(&a, &b);
    let fused = Smooth::fused(&pair, 0.25, Device::Cpu)
        .certify_all(&x, key, &s)
        .unwrap();
    let alone_a = Smooth::new(&a, 0.25, Device::Cpu)
        .certify(&x, key, &s)
        .unwrap();
    let alone_b = Smooth::new(&b, 0.25, Device::Cpu)
        .certify(&x, key, &s)
        .unwrap();
    assert_eq!(fused, vec![alone_a, alone_b]);
    assert_eq!(fused[0].predict, Some(1));
    assert_eq!(fused[1].predict, Some(0));
}

/// Three linear models as one set that records which members each forward pass computed.
struct Recording<'a> {
    models: Vec<&'a TwoClassLinear>,
    calls: std::sync::Mutex<Vec<Vec<bool>>>,
}

impl ClassifierSet for Recording<'_> {
    fn members(&self) -> usize {
        self.models.len()
    }
    fn num_classes(&self) -> usize {
        2
    }
    fn logits_all(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        self.models.iter().map(|m| m.logits(x)).collect()
    }
    fn logits_active(
        &self,
        x: &Tensor,
        active: &[bool],
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        if let Ok(mut c) = self.calls.lock() {
            c.push(active.to_vec());
        }
        self.models
            .iter()
            .zip(active)
            .map(|(m, &a)| a.then(|| m.logits(x)).transpose())
            .collect()
    }
}

fn seq_settings() -> SequentialSettings {
    SequentialSettings {
        n0: 50,
        n_max: 3_000,
        batch: 200,
        alpha: 0.001,
        radii: vec![0.1, 0.25],
        prior: BetaPrior::default(),
    }
}

#[test]
fn fused_sequential_members_stop_at_their_own_times_and_equal_separate_runs() {
    // Margin 0.6 decides both radii within a few batches; 0.27 sits just above r = 0.25 and
    // keeps sampling; −0.3 picks class 0 and decides quickly too.
    let (a, x) = model_with_margin(0.6);
    let (b, _) = model_with_margin(0.27);
    let (c, _) = model_with_margin(-0.3);
    let set = Recording {
        models: vec![&a, &b, &c],
        calls: Default::default(),
    };
    let s = seq_settings();
    let key = NoiseKey {
        seed: 11,
        sigma: 0.25,
        idx: 2,
    };
    let fused = Smooth::fused(&set, 0.25, Device::Cpu)
        .certify_sequential_all(&x, key, &s, None)
        .unwrap();
    let alone: Vec<_> = [&a, &b, &c]
        .iter()
        .map(|m| {
            Smooth::new(*m, 0.25, Device::Cpu)
                .certify_sequential(&x, key, &s)
                .unwrap()
        })
        .collect();
    assert_eq!(fused, alone);
    assert!(fused[0].draws < fused[1].draws, "{fused:?}");
    assert_eq!(fused[2].c_hat, 0);
    // The shared batches shrank: once member 0 stopped, passes no longer computed it, and
    // the number of passes is the longest member's draws over the batch size.
    let calls = set.calls.lock().unwrap().clone();
    let longest = fused.iter().map(|f| f.draws).max().unwrap();
    assert_eq!(calls.len() as u64, longest.div_ceil(s.batch as u64));
    let member0_passes = calls.iter().filter(|c| c[0]).count() as u64;
    assert_eq!(member0_passes, fused[0].draws.div_ceil(s.batch as u64));
    assert!(calls.last().is_some_and(|c| !c[0]));
}

#[test]
fn stop_if_wrong_stops_a_wrong_member_after_selection_only() {
    let (a, x) = model_with_margin(0.6);
    let (c, _) = model_with_margin(-0.6);
    let set = Recording {
        models: vec![&a, &c],
        calls: Default::default(),
    };
    let s = seq_settings();
    let key = NoiseKey {
        seed: 3,
        sigma: 0.25,
        idx: 0,
    };
    let fused = Smooth::fused(&set, 0.25, Device::Cpu)
        .certify_sequential_all(&x, key, &s, Some(1))
        .unwrap();
    let right = Smooth::new(&a, 0.25, Device::Cpu)
        .certify_sequential(&x, key, &s)
        .unwrap();
    assert_eq!(fused[0], right);
    let wrong = &fused[1];
    assert!(wrong.stopped_wrong);
    assert_eq!((wrong.c_hat, wrong.draws, wrong.n_a), (0, 0, 0));
    assert_eq!((wrong.predict, wrong.radius), (None, 0.0));
    assert!(set.calls.lock().unwrap().iter().all(|c| !c[1]));
    // Every member wrong: no estimation pass at all.
    let none = Smooth::fused(&set, 0.25, Device::Cpu)
        .certify_sequential_all(&x, key, &s, Some(7))
        .unwrap();
    assert!(none.iter().all(|c| c.stopped_wrong && c.draws == 0));
}

#[test]
fn a_stored_sequential_row_recomputes_to_the_same_certificate() {
    let (a, x) = model_with_margin(0.4);
    let s = seq_settings();
    let key = NoiseKey {
        seed: 9,
        sigma: 0.25,
        idx: 1,
    };
    let cert = Smooth::new(&a, 0.25, Device::Cpu)
        .certify_sequential(&x, key, &s)
        .unwrap();
    let again = sequential_certificate_from_counts(
        cert.c_hat, cert.n_a, cert.draws, s.alpha, s.prior, 0.25, &s.radii,
    );
    assert_eq!(again, cert);
}

#[test]
fn sequential_radii_stay_below_the_exact_radius_and_approach_it_as_n_max_grows() {
    // Margin 0.3 at σ = 0.25: the exact radius is 0.3 and p_A = Φ(1.2). Requesting r = 0.3
    // puts the threshold at p_A itself, so no run can decide it and each uses all of n_max:
    // the certificate's only way above the truth is the bound failing (rate ≤ α).
    let (model, x) = model_with_margin(0.3);
    let smooth = Smooth::new(&model, 0.25, Device::Cpu);
    let alpha = 0.05;
    let images = 40u64;
    let mean_radius = |n_max: u64| -> (f64, u64) {
        let s = SequentialSettings {
            n0: 20,
            n_max,
            batch: 500,
            alpha,
            radii: vec![0.3],
            prior: BetaPrior::default(),
        };
        let mut above = 0;
        let mut sum = 0.0;
        for idx in 0..images {
            let key = NoiseKey {
                seed: 21,
                sigma: 0.25,
                idx,
            };
            let c = smooth.certify_sequential(&x, key, &s).unwrap();
            assert_eq!(c.draws, n_max);
            if c.radius > 0.3 {
                above += 1;
            }
            sum += c.radius;
        }
        (sum / images as f64, above)
    };
    let (small, above_small) = mean_radius(400);
    let (large, above_large) = mean_radius(4_000);
    // α·images = 2 expected at most; 3 binomial standard deviations of slack.
    let slack =
        (images as f64 * alpha + 3.0 * (images as f64 * alpha * (1.0 - alpha)).sqrt()) as u64;
    assert!(
        above_small <= slack && above_large <= slack,
        "{above_small} {above_large}"
    );
    assert!(small < large && large < 0.3, "{small} {large}");
    assert!(0.3 - large < 0.06, "{large}");
}

#[test]
fn staged_certification_reads_cohens_draws_at_each_stage() {
    // A margin near r = 0.25 keeps the staged run going to its last stage; there its count
    // is CERTIFY's count at n = that stage (same streams, another batch size), and the bound
    // is Clopper–Pearson at α split over the stages.
    let (a, x) = model_with_margin(0.27);
    let smooth = Smooth::new(&a, 0.25, Device::Cpu);
    let key = NoiseKey {
        seed: 4,
        sigma: 0.25,
        idx: 2,
    };
    let staged = StagedSettings {
        n0: 50,
        stages: vec![300, 3_000],
        batch: 170,
        alpha: 0.001,
        radii: vec![0.25],
    };
    let cert = smooth.certify_staged(&x, key, &staged).unwrap();
    assert_eq!(cert.draws, 3_000, "undecided at the first stage");
    let cohen = smooth
        .certify(
            &x,
            key,
            &Settings {
                n0: 50,
                n: 3_000,
                alpha: 0.001,
                batch: 200,
            },
        )
        .unwrap();
    assert_eq!((cert.c_hat, cert.n_a), (cohen.c_hat, cohen.n_a));
    let (lower, _) = sequential::staged_lower_upper(cert.n_a, 3_000, 0.001, 2);
    assert_eq!(cert.lower, lower);
    // A clear margin decides at the first stage.
    let (b, y) = model_with_margin(0.9);
    let early = Smooth::new(&b, 0.25, Device::Cpu)
        .certify_staged(&y, key, &staged)
        .unwrap();
    assert_eq!(early.draws, 300);
    assert!(early.radius > 0.25, "{early:?}");
}
