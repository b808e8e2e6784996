//! GFLOP/s of one thread of the `gemm` crate (0.19, as caf uses it) on the GEMMs of ResNet-20's
//! training convolutions, per image and per band of output rows as `src/models/conv.rs` calls
//! them, in the orientation caf uses and in the transposed one: does the thin side of these
//! matrices (16–64 output channels) cost efficiency, and would swapping the operands help?

use std::time::Instant;

/// A strided view: (data, row stride, column stride).
type View<'a> = (&'a [f32], usize, usize);

/// c[m×n] += a[m×k] · b[k×n], `reps` times; returns GFLOP/s.
fn rate(
    m: usize,
    n: usize,
    k: usize,
    a: View,
    b: View,
    c: (&mut [f32], usize, usize),
    reps: usize,
) -> f64 {
    let fits = |(d, rs, cs): (usize, usize, usize), rows: usize, cols: usize| {
        (rows - 1) * rs + (cols - 1) * cs < d
    };
    assert!(
        fits((a.0.len(), a.1, a.2), m, k)
            && fits((b.0.len(), b.1, b.2), k, n)
            && fits((c.0.len(), c.1, c.2), m, n)
    );
    let t = Instant::now();
    for _ in 0..reps {
        // SAFETY: the assert bounds every element read or written; c does not alias a or b.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.0.as_mut_ptr(),
                c.2 as isize,
                c.1 as isize,
                true,
                a.0.as_ptr(),
                a.2 as isize,
                a.1 as isize,
                b.0.as_ptr(),
                b.2 as isize,
                b.1 as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
    2.0 * (m * n * k * reps) as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let operand = vec![0.5f32; 8 << 20];
    let mut out = vec![0f32; 4 << 20];
    // (layer, c_out, rows = c_in·9, columns per call = one band of output rows of one image)
    let shapes = [
        ("stage 1 (16 ch, 32×32), band of 14 rows", 16, 144, 448),
        ("stage 1, whole image", 16, 144, 1024),
        ("stage 2 (32 ch, 16×16), band of 14 rows", 32, 288, 224),
        ("stage 3 (64 ch, 8×8), whole image", 64, 576, 64),
        ("stage 3, eight images side by side", 64, 576, 512),
        // The default CAF adapter (ResNet-18 at 1/8 width): 8 channels at 32×32.
        ("adapter stage 1 (8 ch, 32×32), band of 14 rows", 8, 72, 448),
        ("adapter stage 1, whole image", 8, 72, 1024),
    ];
    println!("GFLOP/s, one thread; forward y = W·col (and its transpose), weight gradient gwᵀ = col·gyᵀ (and gw = gy·colᵀ)");
    for (name, co, rows, nb) in shapes {
        let reps = (2_000_000_000 / (2 * co * rows * nb)).max(1);
        let fwd = rate(
            co,
            nb,
            rows,
            (&operand, rows, 1),
            (&operand, nb, 1),
            (&mut out, nb, 1),
            reps,
        );
        let fwd_t = rate(
            nb,
            co,
            rows,
            (&operand, 1, nb),
            (&operand, 1, rows),
            (&mut out, 1, nb),
            reps,
        );
        let wgrad = rate(
            rows,
            co,
            nb,
            (&operand, nb, 1),
            (&operand, 1, nb),
            (&mut out, co, 1),
            reps,
        );
        let wgrad_t = rate(
            co,
            rows,
            nb,
            (&operand, nb, 1),
            (&operand, 1, nb),
            (&mut out, rows, 1),
            reps,
        );
        println!("{name}: c_out {co}, k {rows}, n {nb}: forward {fwd:.1} (transposed {fwd_t:.1}); weight gradient {wgrad:.1} (other way {wgrad_t:.1})");
    }
}
