//! Cohen et al. 2019's PREDICT and CERTIFY for a smoothed classifier g(x) = argmax_c P(f(x+δ) = c),
//! δ ~ N(0, σ²I) in [0,1] pixel space.
//!
//! Follows `core.py` of locuslab/smoothing step by step: selection draws (n0) and estimation
//! draws (n) come from independent noise streams; p_A is bounded below with a one-sided
//! Clopper–Pearson interval at level α; the radius is σ·Φ⁻¹(p_A_lower); the smoothed classifier
//! abstains when p_A_lower ≤ 1/2. No clamping of noisy inputs, as in Cohen's code.

pub mod noise;
pub mod sequential;
pub mod stats;

use candle_core::{Device, Tensor};

use crate::models::Classifier;
pub use noise::{NoiseKey, NoiseStream, Phase};
pub use sequential::{
    sequential_certificate_from_counts, BetaPrior, SequentialCertificate, SequentialSettings,
    StagedSettings,
};

/// Default settings of Cohen's `certify.py`.
pub const DEFAULT_N0: u64 = 100;
pub const DEFAULT_N: u64 = 100_000;
pub const DEFAULT_ALPHA: f64 = 0.001;
pub const DEFAULT_BATCH: usize = 400;

#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    #[error("invalid certification settings: {0}")]
    Settings(String),
    #[error("model returned {got} predictions for a batch of {want}")]
    BatchMismatch { got: usize, want: usize },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("the thread drawing the noise stopped before the last batch")]
    NoiseThread,
}

/// n0, n, α and the batch size of one certification.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    pub n0: u64,
    pub n: u64,
    pub alpha: f64,
    pub batch: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            n0: DEFAULT_N0,
            n: DEFAULT_N,
            alpha: DEFAULT_ALPHA,
            batch: DEFAULT_BATCH,
        }
    }
}

impl Settings {
    pub fn validate(&self) -> Result<(), CertifyError> {
        if self.n0 == 0 || self.n == 0 {
            return Err(CertifyError::Settings("n0 and n must be at least 1".into()));
        }
        if self.n0 >= self.n {
            return Err(CertifyError::Settings(format!(
                "n0 ({}) must be smaller than n ({})",
                self.n0, self.n
            )));
        }
        if !(self.alpha > 0.0 && self.alpha < 1.0) {
            return Err(CertifyError::Settings(format!(
                "alpha must be in (0, 1), got {}",
                self.alpha
            )));
        }
        if self.batch == 0 {
            return Err(CertifyError::Settings("batch must be at least 1".into()));
        }
        Ok(())
    }
}

/// The outcome of CERTIFY on one image, with the counts needed to recompute it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Certificate {
    /// The predicted class, or `None` when the smoothed classifier abstains.
    pub predict: Option<u32>,
    /// Certified ℓ2 radius in [0,1]-pixel units; 0 on abstention (as Cohen's logs write it).
    pub radius: f64,
    /// The class picked by the selection round (reported even when abstaining).
    pub c_hat: u32,
    /// Estimation-round count of `c_hat`.
    pub n_a: u64,
    pub n: u64,
}

/// The outcome of PREDICT on one image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prediction {
    pub predict: Option<u32>,
    pub n_a: u64,
    pub n_b: u64,
}

/// Several base classifiers evaluated on the same inputs: fused certification computes a shared
/// backbone once per noise batch and certifies every member on the same draws.
pub trait ClassifierSet: Send + Sync {
    fn members(&self) -> usize;
    fn num_classes(&self) -> usize;
    /// One logits tensor [B, classes] per member.
    fn logits_all(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>>;
    /// Logits of the members marked in `active` (`None` for the others). Sequential
    /// certification stops members at different times; a set that can skip a stopped member's
    /// forward pass overrides this, the default computes every member and drops the rest.
    fn logits_active(
        &self,
        x: &Tensor,
        active: &[bool],
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        Ok(self
            .logits_all(x)?
            .into_iter()
            .enumerate()
            .map(|(i, l)| active.get(i).copied().unwrap_or(false).then_some(l))
            .collect())
    }
}

/// A single classifier as a set of one.
struct One<'m>(&'m dyn Classifier);

impl ClassifierSet for One<'_> {
    fn members(&self) -> usize {
        1
    }
    fn num_classes(&self) -> usize {
        self.0.num_classes()
    }
    fn logits_all(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        Ok(vec![self.0.logits(x)?])
    }
}

/// Noise pipelining by default on every device but the CPU; `CAF_NOISE_PIPELINE=0` or `1` sets
/// it for every device (to measure what it gains).
fn pipeline_default(device: &Device) -> bool {
    match std::env::var("CAF_NOISE_PIPELINE").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => !device.is_cpu(),
    }
}

/// (C, H, W) of a CIFAR image, the default input of [`Smooth`].
const CIFAR_INPUT: (usize, usize, usize) = (3, 32, 32);

/// A smoothed classifier (or a set of them sharing inputs) at noise level σ.
pub struct Smooth<'m> {
    set: Box<dyn ClassifierSet + 'm>,
    sigma: f64,
    device: Device,
    /// (C, H, W) of the images certified; CIFAR's unless [`Smooth::with_input`] says otherwise.
    input: (usize, usize, usize),
    /// Whether fixed-n sampling draws the next batch's noise on a second thread while the device
    /// classifies the current one: on a GPU, where the host's noise (one core draws about 60,000
    /// noisy CIFAR images a second, `caf bench noise`) would otherwise wait for the device and
    /// the device for it. Not on the CPU, whose cores are all classifying already.
    pipeline: bool,
}

impl<'m> Smooth<'m> {
    pub fn new(model: &'m dyn Classifier, sigma: f64, device: Device) -> Self {
        Self {
            set: Box::new(One(model)),
            sigma,
            pipeline: pipeline_default(&device),
            device,
            input: CIFAR_INPUT,
        }
    }

    /// Smooths every member of `set`; all of them see exactly the same noise draws.
    pub fn fused(set: &'m dyn ClassifierSet, sigma: f64, device: Device) -> Self {
        struct Borrowed<'a>(&'a dyn ClassifierSet);
        impl ClassifierSet for Borrowed<'_> {
            fn members(&self) -> usize {
                self.0.members()
            }
            fn num_classes(&self) -> usize {
                self.0.num_classes()
            }
            fn logits_all(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
                self.0.logits_all(x)
            }
            fn logits_active(
                &self,
                x: &Tensor,
                active: &[bool],
            ) -> candle_core::Result<Vec<Option<Tensor>>> {
                self.0.logits_active(x, active)
            }
        }
        Self {
            set: Box::new(Borrowed(set)),
            sigma,
            pipeline: pipeline_default(&device),
            device,
            input: CIFAR_INPUT,
        }
    }

    /// Draws noise on a second thread during the device's work (or not), whatever the device:
    /// the certificates are the same either way.
    pub fn with_pipeline(mut self, pipeline: bool) -> Self {
        self.pipeline = pipeline;
        self
    }

    /// Certifies images of (C, H, W) = `input` (the data set's shape) instead of 3 × 32 × 32.
    pub fn with_input(mut self, input: (usize, usize, usize)) -> Self {
        self.input = input;
        self
    }

    pub fn sigma(&self) -> f64 {
        self.sigma
    }

    /// CERTIFY(x, n0, n, α): with probability at least 1 − α over the noise, the returned
    /// prediction of g is robust within the returned ℓ2 radius (or g abstains).
    /// `image` is (C, H, W) f32 in [0,1]; `key` fixes the noise (see [`noise`]).
    pub fn certify(
        &self,
        image: &[f32],
        key: NoiseKey,
        s: &Settings,
    ) -> Result<Certificate, CertifyError> {
        let mut all = self.certify_all(image, key, s)?;
        Ok(all.swap_remove(0))
    }

    /// CERTIFY for every member of the set, on shared noise (one certificate per member, each
    /// identical to what certifying that member alone with the same key gives).
    pub fn certify_all(
        &self,
        image: &[f32],
        key: NoiseKey,
        s: &Settings,
    ) -> Result<Vec<Certificate>, CertifyError> {
        s.validate()?;
        // Selection: each member guesses its top class from n0 draws.
        let counts0 = self.sample_counts(image, key, Phase::Selection, s.n0, s.batch)?;
        // Estimation: count each member's guess in n fresh draws.
        let counts = self.sample_counts(image, key, Phase::Estimation, s.n, s.batch)?;
        Ok(counts0
            .iter()
            .zip(&counts)
            .map(|(c0, c)| {
                let c_hat = argmax_count(c0);
                certificate_from_counts(c_hat, c[c_hat as usize], s.n, s.alpha, self.sigma)
            })
            .collect())
    }

    /// Sequential CERTIFY for the first member (see [`sequential`]): ĉ from `s.n0` selection
    /// draws, then estimation draws in batches of `s.batch` until every radius in `s.radii` is
    /// certified or impossible under the beta-binomial mixture confidence sequence, or until
    /// `s.n_max`. Noise comes from the same streams as [`Self::certify`], so its first n
    /// estimation draws are CERTIFY's, whatever the batch size.
    pub fn certify_sequential(
        &self,
        image: &[f32],
        key: NoiseKey,
        s: &sequential::SequentialSettings,
    ) -> Result<sequential::SequentialCertificate, sequential::SequentialError> {
        let mut all = self.certify_sequential_all(image, key, s, None)?;
        if all.is_empty() {
            return Err(CertifyError::BatchMismatch { got: 0, want: 1 }.into());
        }
        Ok(all.swap_remove(0))
    }

    /// Sequential CERTIFY for every member of the set on shared noise: one selection round for
    /// all, then shared estimation batches that only the members still undecided consume (the
    /// forward pass of a stopped member is skipped where the set allows it). Each member's
    /// certificate equals what certifying it alone with the same key gives.
    ///
    /// `stop_unless`: with `Some(label)`, a member whose ĉ is not `label` stops right after
    /// selection (`stop_if_wrong`: it could never count towards certified accuracy).
    pub fn certify_sequential_all(
        &self,
        image: &[f32],
        key: NoiseKey,
        s: &sequential::SequentialSettings,
        stop_unless: Option<u32>,
    ) -> Result<Vec<sequential::SequentialCertificate>, sequential::SequentialError> {
        use sequential::Start;
        s.validate()?;
        let counts0 = self.sample_counts(image, key, Phase::Selection, s.n0, s.batch)?;
        let starts: Vec<Start> = counts0
            .iter()
            .map(|c| {
                let c_hat = argmax_count(c);
                match stop_unless {
                    Some(label) if label != c_hat => Start::StopWrong(c_hat),
                    _ => Start::Estimate(c_hat),
                }
            })
            .collect();
        let mut stream = NoiseStream::new(key, Phase::Estimation);
        let mut buf = Vec::new();
        let mut hits_of = |k: usize, active: &[bool]| -> Result<Vec<u64>, CertifyError> {
            let x = self.noisy_batch(&mut stream, image, k, &mut buf)?;
            let logits = self.set.logits_active(&x, active)?;
            if logits.len() != starts.len() {
                return Err(CertifyError::BatchMismatch {
                    got: logits.len(),
                    want: starts.len(),
                });
            }
            let mut hits = vec![0u64; starts.len()];
            for ((h, l), st) in hits.iter_mut().zip(&logits).zip(&starts) {
                let (Some(l), Start::Estimate(c_hat)) = (l, st) else {
                    continue;
                };
                *h = predictions(l, k)?.iter().filter(|&&p| p == *c_hat).count() as u64;
            }
            Ok(hits)
        };
        sequential::certify_mixture_shared(&starts, self.sigma, s, |k, active| {
            hits_of(k, active).map_err(sequential::SequentialError::from)
        })
    }

    /// Staged Clopper–Pearson CERTIFY for the first member ([`sequential::certify_staged`]):
    /// the simplest valid alternative to the mixture, for comparisons (`caf bench certify
    /// --mode staged`). It reads the same noise streams as [`Self::certify`], so at each stage
    /// it has seen exactly CERTIFY's first draws.
    pub fn certify_staged(
        &self,
        image: &[f32],
        key: NoiseKey,
        s: &sequential::StagedSettings,
    ) -> Result<sequential::SequentialCertificate, sequential::SequentialError> {
        s.validate()?;
        let counts0 = self.sample_counts(image, key, Phase::Selection, s.n0, s.batch)?;
        let c_hat = argmax_count(
            counts0
                .first()
                .ok_or(CertifyError::BatchMismatch { got: 0, want: 1 })?,
        );
        let mut stream = NoiseStream::new(key, Phase::Estimation);
        let mut buf = Vec::new();
        let mut hits_of = |k: usize| -> Result<u64, CertifyError> {
            let x = self.noisy_batch(&mut stream, image, k, &mut buf)?;
            let logits = self.set.logits_all(&x)?;
            let first = logits
                .first()
                .ok_or(CertifyError::BatchMismatch { got: 0, want: 1 })?;
            Ok(predictions(first, k)?
                .iter()
                .filter(|&&p| p == c_hat)
                .count() as u64)
        };
        sequential::certify_staged(c_hat, self.sigma, s, |k| {
            hits_of(k).map_err(sequential::SequentialError::from)
        })
    }

    /// PREDICT(x, n, α) for the first member: the top class if the two-sided binomial test
    /// between the top two counts rejects at level α, else abstain. Wrong with probability at
    /// most α.
    pub fn predict(
        &self,
        image: &[f32],
        key: NoiseKey,
        n: u64,
        alpha: f64,
        batch: usize,
    ) -> Result<Prediction, CertifyError> {
        let all = self.sample_counts(image, key, Phase::Prediction, n, batch.max(1))?;
        let counts = &all[0];
        let mut order: Vec<usize> = (0..counts.len()).collect();
        // Stable sort: ties go to the lower class index, like numpy's argsort on -counts.
        order.sort_by(|&a, &b| counts[b].cmp(&counts[a]));
        let (top, second) = (order[0], order.get(1).copied());
        let n_a = counts[top];
        let n_b = second.map(|c| counts[c]).unwrap_or(0);
        let predict = if stats::binom_test_half(n_a, n_a + n_b) > alpha {
            None
        } else {
            Some(top as u32)
        };
        Ok(Prediction { predict, n_a, n_b })
    }

    /// The next `k` noisy copies of `image` from `stream`, as a batch on the device.
    fn noisy_batch(
        &self,
        stream: &mut NoiseStream,
        image: &[f32],
        k: usize,
        buf: &mut Vec<f32>,
    ) -> Result<Tensor, CertifyError> {
        stream.fill_noisy(image, k, buf);
        self.batch_tensor(buf, k)
    }

    /// `k` noisy copies drawn into `buf`, as a batch on the device.
    fn batch_tensor(&self, buf: &[f32], k: usize) -> Result<Tensor, CertifyError> {
        let (c, h, w) = self.input;
        Ok(Tensor::from_slice(buf, (k, c, h, w), &self.device)?)
    }

    /// Class counts of every member over `num` noisy copies of `image`.
    fn sample_counts(
        &self,
        image: &[f32],
        key: NoiseKey,
        phase: Phase,
        num: u64,
        batch: usize,
    ) -> Result<Vec<Vec<u64>>, CertifyError> {
        let mut counts = vec![vec![0u64; self.set.num_classes()]; self.set.members()];
        let mut stream = NoiseStream::new(key, phase);
        let mut count = |x: &Tensor, this: usize| -> Result<(), CertifyError> {
            let logits = self.set.logits_all(x)?;
            if logits.len() != counts.len() {
                return Err(CertifyError::BatchMismatch {
                    got: logits.len(),
                    want: counts.len(),
                });
            }
            for (member, l) in counts.iter_mut().zip(logits) {
                for p in predictions(&l, this)? {
                    if let Some(c) = member.get_mut(p as usize) {
                        *c += 1;
                    }
                }
            }
            Ok(())
        };
        if !self.pipeline {
            let mut buf = Vec::new();
            for this in batches(num, batch) {
                count(&self.noisy_batch(&mut stream, image, this, &mut buf)?, this)?;
            }
            return Ok(counts);
        }
        // The next batch's noise is drawn on a second thread while the device classifies this
        // one: the same stream in the same order, so the same draws.
        std::thread::scope(|scope| {
            let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Vec<f32>>(1);
            let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<f32>>();
            scope.spawn(move || {
                for this in batches(num, batch) {
                    let mut buf = empty_rx.try_recv().unwrap_or_default();
                    stream.fill_noisy(image, this, &mut buf);
                    // The receiver is gone only when the classifying side failed and returned.
                    if full_tx.send(buf).is_err() {
                        return;
                    }
                }
            });
            for this in batches(num, batch) {
                let buf = full_rx.recv().map_err(|_| CertifyError::NoiseThread)?;
                count(&self.batch_tensor(&buf, this)?, this)?;
                // Two buffers circulate; a send fails only once the drawing side has finished.
                let _ = empty_tx.send(buf);
            }
            Ok::<_, CertifyError>(())
        })?;
        Ok(counts)
    }
}

/// The batch sizes that split `num` draws into batches of `batch`, the last one shorter.
fn batches(num: u64, batch: usize) -> impl Iterator<Item = usize> {
    let batch = batch.max(1) as u64;
    (0..num.div_ceil(batch)).map(move |i| (num - i * batch).min(batch) as usize)
}

/// The certificate implied by an estimation count: a pure function, so anyone can recompute a
/// stored certificate from (c_hat, n_a, n, α, σ).
pub fn certificate_from_counts(
    c_hat: u32,
    n_a: u64,
    n: u64,
    alpha: f64,
    sigma: f64,
) -> Certificate {
    let p_a_lower = stats::clopper_pearson_lower(n_a, n, alpha);
    if p_a_lower <= 0.5 {
        Certificate {
            predict: None,
            radius: 0.0,
            c_hat,
            n_a,
            n,
        }
    } else {
        Certificate {
            predict: Some(c_hat),
            radius: stats::radius(sigma, p_a_lower),
            c_hat,
            n_a,
            n,
        }
    }
}

/// argmax of the logits per row.
pub fn predict_classes(model: &dyn Classifier, x: &Tensor) -> candle_core::Result<Vec<u32>> {
    model.logits(x)?.argmax(1)?.to_vec1::<u32>()
}

/// The predicted class of each of the `k` rows of `logits`.
fn predictions(logits: &Tensor, k: usize) -> Result<Vec<u32>, CertifyError> {
    let preds = logits.argmax(1)?.to_vec1::<u32>()?;
    if preds.len() != k {
        return Err(CertifyError::BatchMismatch {
            got: preds.len(),
            want: k,
        });
    }
    Ok(preds)
}

/// Index of the largest count; ties go to the lowest index (numpy's argmax).
fn argmax_count(counts: &[u64]) -> u32 {
    let mut best = 0usize;
    for (i, &c) in counts.iter().enumerate() {
        if c > counts[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests;
