//! The `caf` binary: flag parsing and glue only; everything else lives in the library.

mod cli;

fn main() {
    tune_allocator();
    single_threaded_candle_elementwise();
    std::process::exit(cli::main());
}

/// Keep freed activation buffers in the heap instead of handing them back to the kernel.
///
/// Why: a training step allocates and frees tens of megabytes of activations and gradients
/// (candle allocates a fresh buffer per op). glibc serves blocks above a dynamic threshold
/// with mmap and trims the heap top eagerly, so each step page-faulted its buffers in again:
/// `perf` showed a quarter of the CAF training step in page faults and zeroing pages.
/// Measured with `caf bench train-step --method caf` on the 2-core CI machine: 223 → 355
/// images/s (`--method rs`: 97 → 180). The cost is that up to 1 GiB of freed memory stays
/// mapped to the process.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // 32 MiB is the largest mmap threshold glibc accepts on 64-bit targets.
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        const TRIM_THRESHOLD: libc::c_int = 1 << 30;
        // SAFETY: mallopt only changes allocator parameters; it runs before any other thread
        // exists. A rejected value leaves glibc's default in place, which is still correct.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}

/// Run candle's element-wise CPU kernels on the calling thread unless the user says otherwise.
///
/// Why: candle 0.11 parallelises element-wise ops (BatchNorm's arithmetic, ReLU, additions) on
/// its own spinning barrier pool, next to rayon's pool that caf's convolutions and GEMMs use.
/// On a 2-core machine the two pools' threads spin against each other: `perf` showed over a
/// third of a CAF training step in candle's `BarrierGuard::drop` waiting for a descheduled
/// worker. Measured with `caf bench train-step --method caf` while another job ran on the
/// machine: 66 → 205 images/s with `CANDLE_NUM_THREADS=1` (see README, Performance).
fn single_threaded_candle_elementwise() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: called first thing in main, before any other thread exists, so nothing can
        // read the environment concurrently.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}
