//! Shared helpers for the GPU-vs-CPU unit tests.

use std::sync::OnceLock;

use rand::{Rng, SeedableRng};

use crate::gpu::{Gpu, GpuOptions};

/// One device shared by all tests in the process (wgpu devices are Sync).
pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| Gpu::new(&GpuOptions::default()).unwrap_or_else(|e| panic!("test GPU: {e}")))
}

/// A device whose storage-binding limit for tensor splitting is capped at
/// `max_binding` bytes, so split paths run on small data.
pub fn gpu_with_split(max_binding: u64) -> Gpu {
    Gpu::new(&GpuOptions {
        max_binding_override: Some(max_binding),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("test GPU: {e}"))
}

/// Seeded uniform values in `[-scale, scale)`.
pub fn rand_vec(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// Normalized mean squared error: sum((a-b)^2) / sum(b^2).
pub fn nmse(got: &[f32], want: &[f32]) -> f64 {
    let mut num = 0f64;
    let mut den = 0f64;
    for (&a, &b) in got.iter().zip(want) {
        num += ((a - b) as f64).powi(2);
        den += (b as f64).powi(2);
    }
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

/// Element-wise `|got - want| <= atol + rtol * |want|`; on failure, panics
/// naming the worst element.
pub fn assert_close(got: &[f32], want: &[f32], rtol: f32, atol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst: Option<(usize, f32)> = None;
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        let err = (a - b).abs();
        let lim = atol + rtol * b.abs();
        if err.is_nan() || err > lim {
            let excess = if err.is_nan() {
                f32::INFINITY
            } else {
                err / lim
            };
            if worst.is_none_or(|(_, e)| excess > e) {
                worst = Some((i, excess));
            }
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: element {i}: got {} want {} (rtol {rtol}, atol {atol}); nmse {:.3e}",
            got[i],
            want[i],
            nmse(got, want)
        );
    }
}
