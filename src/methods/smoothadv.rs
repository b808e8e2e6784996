//! SmoothAdv (Salman et al. 2019): adversarial training of the base classifier against the
//! *smoothed soft* classifier. For each clean (augmented) training image x, PGD looks for one
//! ℓ2 perturbation δ, ‖δ‖ ≤ ε, shared by m noise draws δ₁…δ_m ~ N(0, σ²I), that maximises
//! −log( (1/m) Σ_j softmax(f(x + δ + δ_j))_y ); the network is then trained with cross-entropy
//! on all m noisy copies x + δ + δ_j. ε grows linearly over the first `warmup_epochs` epochs.
//!
//! Details that decide results, as in the paper's code: T steps of size 2ε/T along the
//! normalised gradient, projection onto the ε-ball after each step, and x + δ clipped to the
//! [0, 1] image box; the attack runs the network in eval mode on a detached copy of its
//! weights (input gradients only) and the noise draws are keyed by (seed, step), so training
//! stays reproducible and resumable. Defaults: ε = 0.25 (64/256 in the paper's units of [0,1]
//! pixels), T = 10, m = 1, warm-up 10 epochs; specs scale them down.

use candle_core::{DType, Tensor, Var, D};
use candle_nn::ModuleT;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use super::train::batches::{keyed_rng, Batch};
use super::train::{Objective, StepKey};
use crate::models::Backbone;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SmoothAdvConfig {
    /// ℓ2 budget ε in [0, 1] pixel units.
    pub epsilon: f64,
    /// PGD steps T.
    pub steps: usize,
    /// Noise draws m per image (the attack averages over them; training uses all of them).
    pub noise_draws: usize,
    /// ε rises linearly from ε/warmup to ε over these epochs.
    pub warmup_epochs: usize,
}

impl Default for SmoothAdvConfig {
    fn default() -> Self {
        SmoothAdvConfig {
            epsilon: 0.25,
            steps: 10,
            noise_draws: 1,
            warmup_epochs: 10,
        }
    }
}

impl SmoothAdvConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.epsilon.is_finite() && self.epsilon >= 0.0) {
            return Err(format!("epsilon must be ≥ 0, found {}", self.epsilon));
        }
        if !(1..=100).contains(&self.steps) {
            return Err(format!(
                "pgd_steps must be in 1..=100, found {}",
                self.steps
            ));
        }
        if !(1..=64).contains(&self.noise_draws) {
            return Err(format!(
                "noise_draws must be in 1..=64, found {}",
                self.noise_draws
            ));
        }
        Ok(())
    }

    /// ε at `epoch` (counted from 0).
    pub fn epsilon_at(&self, epoch: usize) -> f64 {
        if self.warmup_epochs == 0 {
            return self.epsilon;
        }
        self.epsilon * ((epoch + 1) as f64 / self.warmup_epochs as f64).min(1.0)
    }
}

/// The SmoothAdv training objective of a trainable CIFAR ResNet at noise level `sigma`.
pub struct SmoothAdvLoss<'a> {
    pub model: &'a Backbone,
    pub cfg: &'a SmoothAdvConfig,
    pub sigma: f32,
}

/// m noise draws for a batch of `b` images shaped like `like`'s (C, H, W), stacked draw-major:
/// [m·b, C, H, W].
fn noise(
    at: StepKey,
    m: usize,
    b: usize,
    sigma: f32,
    like: &Tensor,
) -> candle_core::Result<Tensor> {
    let mut rng = keyed_rng(
        b"caf-smoothadv-noise-v1",
        &[at.seed, at.epoch as u64, at.step],
    );
    let (_, c, h, w) = like.dims4()?;
    let n = m * b * c * h * w;
    let v: Vec<f32> = (0..n)
        .map(|_| sigma * <StandardNormal as Distribution<f32>>::sample(&StandardNormal, &mut rng))
        .collect();
    Tensor::from_vec(v, (m * b, c, h, w), like.device())
}

/// Per-image ℓ2 norms of [B, C, H, W] as [B, 1, 1, 1].
fn norms(t: &Tensor) -> candle_core::Result<Tensor> {
    let b = t.dim(0)?;
    t.sqr()?
        .flatten_from(1)?
        .sum(1)?
        .sqrt()?
        .reshape((b, 1, 1, 1))
}

/// PGD on the smoothed soft classifier: returns δ with ‖δ_i‖ ≤ ε and x + δ ∈ [0, 1].
pub fn attack(
    frozen: &dyn ModuleT,
    clean: &Tensor,
    labels: &Tensor,
    noise: &Tensor,
    m: usize,
    epsilon: f64,
    steps: usize,
) -> candle_core::Result<Tensor> {
    let b = clean.dim(0)?;
    let mut delta = clean.zeros_like()?;
    if epsilon == 0.0 {
        return Ok(delta);
    }
    let step_size = 2.0 * epsilon / steps as f64;
    let labels_rep = Tensor::cat(&vec![labels.clone(); m], 0)?;
    for _ in 0..steps {
        let d = Var::from_tensor(&delta)?;
        let x = Tensor::cat(&vec![(clean + d.as_tensor())?; m], 0)?;
        let logits = frozen.forward_t(&(x + noise)?, false)?;
        let p_y = candle_nn::ops::softmax(&logits, D::Minus1)?
            .gather(&labels_rep.unsqueeze(1)?, 1)?
            .reshape((m, b))?
            .mean(0)?;
        // Summed over images: each image's δ gets its own loss's gradient.
        let loss = (p_y + 1e-12)?.log()?.neg()?.sum_all()?;
        let grads = loss.backward()?;
        let Some(g) = grads.get(d.as_tensor()) else {
            candle_core::bail!("the attack loss does not depend on the perturbation");
        };
        let g = g.broadcast_div(&(norms(g)? + 1e-12)?)?;
        let mut next = (&delta + (g * step_size)?)?;
        // Onto the ε-ball, then into the image box.
        let scale = (norms(&next)? + 1e-12)?
            .recip()?
            .affine(epsilon, 0.0)?
            .clamp(0f32, 1f32)?;
        next = next.broadcast_mul(&scale)?;
        delta = ((clean + next)?.clamp(0f32, 1f32)? - clean)?.detach();
    }
    Ok(delta)
}

impl Objective for SmoothAdvLoss<'_> {
    fn loss(
        &self,
        batch: &Batch,
        train: bool,
        at: StepKey,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        if !train {
            // Validation: accuracy under plain Gaussian noise, comparable across methods.
            let logits = self.model.forward_t(&batch.x, false)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &batch.y)?;
            return Ok((loss, logits));
        }
        let m = self.cfg.noise_draws;
        let b = batch.clean.dim(0)?;
        let noise = noise(at, m, b, self.sigma, &batch.clean)?;
        let frozen = self.model.detached()?;
        let delta = attack(
            &frozen,
            &batch.clean,
            &batch.y,
            &noise,
            m,
            self.cfg.epsilon_at(at.epoch),
            self.cfg.steps,
        )?;
        let adv = (&batch.clean + delta)?;
        let x = (Tensor::cat(&vec![adv; m], 0)? + noise)?;
        let y = Tensor::cat(&vec![batch.y.clone(); m], 0)?;
        let logits = self.model.forward_t(&x.to_dtype(DType::F32)?, true)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        // Accuracy on the first draw, one row per image as the trainer counts it.
        Ok((loss, logits.narrow(0, 0, b)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::models::CifarResNet;

    fn resnet() -> CifarResNet {
        crate::models::test_resnet20()
    }

    fn soft_loss(f: &CifarResNet, x: &Tensor, y: &Tensor, noise: &Tensor, m: usize) -> f32 {
        let b = x.dim(0).expect("dim");
        let xs = Tensor::cat(&vec![x.clone(); m], 0).expect("cat");
        let ys = Tensor::cat(&vec![y.clone(); m], 0).expect("cat");
        let logits = f
            .forward_t(&(xs + noise).expect("add"), false)
            .expect("forward");
        candle_nn::ops::softmax(&logits, D::Minus1)
            .and_then(|p| p.gather(&ys.unsqueeze(1)?, 1))
            .and_then(|p| p.reshape((m, b)))
            .and_then(|p| p.mean(0))
            .and_then(|p| p.log())
            .and_then(|p| p.neg())
            .and_then(|p| p.sum_all())
            .and_then(|p| p.to_scalar::<f32>())
            .expect("loss")
    }

    #[test]
    fn pgd_stays_in_the_ball_and_the_box_and_raises_the_loss() {
        let f = resnet();
        // Images near the box edges, so clipping matters.
        let clean = Tensor::rand(0f32, 1f32, (4, 3, 32, 32), &Device::Cpu)
            .and_then(|t| t.affine(1.2, -0.1))
            .and_then(|t| t.clamp(0f32, 1f32))
            .expect("images");
        let y = Tensor::new(&[0u32, 1, 2, 3], &Device::Cpu).expect("labels");
        let m = 2;
        let at = StepKey {
            seed: 1,
            epoch: 0,
            step: 3,
        };
        let noise = noise(at, m, 4, 0.25, &clean).expect("noise");
        for eps in [0.0, 0.1, 0.5] {
            let delta = attack(&f, &clean, &y, &noise, m, eps, 4).expect("attack");
            let n: Vec<f32> = norms(&delta)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .expect("norms");
            for v in &n {
                assert!(*v <= eps as f32 + 1e-5, "‖δ‖ = {v} > ε = {eps}");
            }
            let adv: Vec<f32> = (&clean + &delta)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .expect("adv");
            assert!(adv.iter().all(|v| (0.0..=1.0).contains(v)));
            if eps > 0.0 {
                let before = soft_loss(&f, &clean, &y, &noise, m);
                let after = soft_loss(&f, &(&clean + &delta).expect("adv"), &y, &noise, m);
                assert!(
                    after > before,
                    "ε={eps}: attack loss {after} ≤ clean {before}"
                );
            }
        }
    }

    #[test]
    fn epsilon_warms_up_linearly() {
        let c = SmoothAdvConfig {
            epsilon: 0.5,
            warmup_epochs: 4,
            ..SmoothAdvConfig::default()
        };
        let e: Vec<f64> = (0..6).map(|k| c.epsilon_at(k)).collect();
        assert_eq!(e, vec![0.125, 0.25, 0.375, 0.5, 0.5, 0.5]);
        assert!(SmoothAdvConfig {
            steps: 0,
            ..c.clone()
        }
        .validate()
        .is_err());
        assert!(SmoothAdvConfig { epsilon: -1.0, ..c }.validate().is_err());
    }

    #[test]
    fn noise_draws_are_keyed_by_the_step() {
        let like = Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).expect("like");
        let at = StepKey {
            seed: 1,
            epoch: 2,
            step: 3,
        };
        let a = noise(at, 2, 3, 0.5, &like).and_then(|t| t.flatten_all()?.to_vec1::<f32>());
        let b = noise(at, 2, 3, 0.5, &like).and_then(|t| t.flatten_all()?.to_vec1::<f32>());
        let c = noise(StepKey { step: 4, ..at }, 2, 3, 0.5, &like)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>());
        assert_eq!(a.as_ref().ok(), b.as_ref().ok());
        assert_ne!(a.ok(), c.ok());
    }
}
