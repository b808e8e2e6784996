//! The `caf` binary: flag parsing and glue only; everything else lives in the library.

mod cli;

fn main() {
    tune_allocator();
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
