//! Which implementation a model runs: caf's fused CPU kernels or candle's own ops.
//!
//! The fused kernels (the folded eval-mode networks, the training convolution, the train-mode
//! BatchNorm and ReLU custom ops, the bf16 GEMM) read and write CPU buffers, so a tensor on any
//! other device (CUDA) must run candle's device-generic ops instead: conv2d, batch norm, relu,
//! matmul. Every fused call site asks [`fused`] first, so a CUDA tensor never reaches a CPU-only
//! op. `CAF_GENERIC_PATH=1` forces the generic path on the CPU too, for the whole process: that
//! is how the GPU check compares the two on one machine, and how a CPU run reproduces what the
//! GPU computes. Tests use [`with_generic_path`], which affects the calling thread only.

use std::cell::Cell;
use std::sync::OnceLock;

use candle_core::Device;

/// Environment variable that forces candle's generic ops on the CPU (`1`, `true` or `yes`).
pub const GENERIC_PATH_ENV: &str = "CAF_GENERIC_PATH";

thread_local! {
    static FORCED: Cell<bool> = const { Cell::new(false) };
}

/// Whether [`GENERIC_PATH_ENV`] asks for the generic path (read once per process).
pub fn generic_forced_by_env() -> bool {
    static ENV: OnceLock<bool> = OnceLock::new();
    *ENV.get_or_init(|| {
        std::env::var(GENERIC_PATH_ENV)
            .map(|v| matches!(v.trim(), "1" | "true" | "yes"))
            .unwrap_or(false)
    })
}

/// Whether tensors on `device` may take the fused CPU kernels.
pub fn fused(device: &Device) -> bool {
    device.is_cpu() && !FORCED.with(Cell::get) && !generic_forced_by_env()
}

/// Runs `f` with the fused kernels off on this thread (the decision is taken on the thread
/// that calls the model, before any kernel fans out to rayon).
pub fn with_generic_path<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FORCED.with(|c| c.replace(true)));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_override_is_scoped_to_the_call_and_never_fuses_other_devices() {
        let cpu = Device::Cpu;
        let before = fused(&cpu);
        assert!(with_generic_path(|| !fused(&cpu)));
        // Nested scopes restore the outer state, not "off".
        with_generic_path(|| {
            with_generic_path(|| {});
            assert!(!fused(&cpu));
        });
        assert_eq!(fused(&cpu), before);
        assert_eq!(before, !generic_forced_by_env());
    }
}
