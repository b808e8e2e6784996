//! Monte Carlo noise that is a pure function of (study seed, σ, image index, phase).
//!
//! Exact resume and paired comparisons both rest on this: the i-th noise draw for image `idx`
//! never depends on batch size, batch order, worker count or restarts, and two models certified
//! at the same σ with the same seed see the same draws. Each (key, phase) gets its own ChaCha12
//! stream, seeded through SHA-256 of the key, and draws are consumed strictly in sample order.

use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;
use rand_distr::{Distribution, StandardNormal};
use sha2::{Digest, Sha256};

/// Which of Cohen's two sampling rounds a draw belongs to: selection (n0) and estimation (n)
/// must use independent noise, or the certificate's guarantee is void.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Selection,
    Estimation,
    /// PREDICT's single round.
    Prediction,
}

impl Phase {
    fn stream(self) -> u64 {
        match self {
            Phase::Selection => 0,
            Phase::Estimation => 1,
            Phase::Prediction => 2,
        }
    }
}

/// Identifies the noise of one image in one study.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NoiseKey {
    pub seed: u64,
    pub sigma: f64,
    pub idx: u64,
}

/// A stream of N(0, σ²) pixel noise for one image and phase.
pub struct NoiseStream {
    rng: ChaCha12Rng,
    sigma: f32,
}

impl NoiseStream {
    pub fn new(key: NoiseKey, phase: Phase) -> Self {
        let mut h = Sha256::new();
        h.update(b"caf-noise-v1");
        h.update(key.seed.to_le_bytes());
        h.update(key.sigma.to_bits().to_le_bytes());
        h.update(key.idx.to_le_bytes());
        let digest = h.finalize();
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&digest[..32]);
        let mut rng = ChaCha12Rng::from_seed(seed);
        rng.set_stream(phase.stream());
        Self {
            rng,
            sigma: key.sigma as f32,
        }
    }

    /// Writes `copies` noisy copies of `image` (values in [0,1]) into `out`: out[k] = image + σ·z.
    /// Draws are consumed in order, so splitting the same samples into different batches
    /// yields the same values.
    pub fn fill_noisy(&mut self, image: &[f32], copies: usize, out: &mut Vec<f32>) {
        out.clear();
        out.reserve(image.len() * copies);
        for _ in 0..copies {
            for &p in image {
                let z: f32 = StandardNormal.sample(&mut self.rng);
                out.push(p + self.sigma * z);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> NoiseKey {
        NoiseKey {
            seed: 7,
            sigma: 0.25,
            idx: 42,
        }
    }

    #[test]
    fn batching_does_not_change_the_draws() {
        let image = vec![0.5f32; 12];
        let mut whole = Vec::new();
        NoiseStream::new(key(), Phase::Estimation).fill_noisy(&image, 10, &mut whole);
        let mut pieces = Vec::new();
        let mut s = NoiseStream::new(key(), Phase::Estimation);
        let mut buf = Vec::new();
        for take in [3, 1, 6] {
            s.fill_noisy(&image, take, &mut buf);
            pieces.extend_from_slice(&buf);
        }
        assert_eq!(whole, pieces);
    }

    #[test]
    fn phases_images_seeds_and_sigmas_get_different_noise() {
        let image = vec![0.0f32; 8];
        let draw = |k: NoiseKey, p: Phase| {
            let mut v = Vec::new();
            NoiseStream::new(k, p).fill_noisy(&image, 1, &mut v);
            v
        };
        let base = draw(key(), Phase::Selection);
        assert_ne!(base, draw(key(), Phase::Estimation));
        assert_ne!(base, draw(NoiseKey { idx: 43, ..key() }, Phase::Selection));
        assert_ne!(base, draw(NoiseKey { seed: 8, ..key() }, Phase::Selection));
        assert_ne!(
            base,
            draw(
                NoiseKey {
                    sigma: 0.5,
                    ..key()
                },
                Phase::Selection
            )
        );
        assert_eq!(base, draw(key(), Phase::Selection));
    }

    #[test]
    fn noise_has_the_requested_standard_deviation() {
        let image = vec![0.0f32; 3072];
        let mut v = Vec::new();
        NoiseStream::new(
            NoiseKey {
                sigma: 0.5,
                ..key()
            },
            Phase::Estimation,
        )
        .fill_noisy(&image, 20, &mut v);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        // 61,440 draws: the sample sd is within 1% of 0.5 with overwhelming probability.
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.005, "sd {}", var.sqrt());
    }
}
