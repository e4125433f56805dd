//! Linear layers: `y = x · Wᵀ (+ b)` with W in nn.Linear layout `[out, in]`.

/// CPU reference: `x` is `[m, k]`, `w` is `[n, k]` (PyTorch `[out, in]`),
/// `b` is `[n]`; returns `[m, n]`. Dot products accumulate in f64.
pub fn reference(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x is not [m, k]");
    assert_eq!(w.len(), n * k, "w is not [n, k]");
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        for j in 0..n {
            let wr = &w[j * k..(j + 1) * k];
            let mut acc = 0f64;
            for t in 0..k {
                acc += xr[t] as f64 * wr[t] as f64;
            }
            if let Some(b) = b {
                acc += b[j] as f64;
            }
            y[i * n + j] = acc as f32;
        }
    }
    y
}
