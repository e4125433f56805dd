//! Greedy sampling: row-wise argmax of f32 logits `[n_tokens, vocab]` into
//! u32 token ids `[n_tokens]`, with torch.argmax semantics (first index of the
//! maximum on ties). NaN never wins; a row of only NaN gives 0.
//!
//! The same pass writes each row's finiteness ([`RowStats`]: NaN and infinite
//! counts, the first non-finite index and its value), so a caller that reads
//! back only the id still learns that a step's logits were not finite.

use crate::error::{Error, Result};
#[cfg(not(target_arch = "wasm32"))]
use crate::gpu::Step;
use crate::gpu::{Gpu, Kernel, KernelProfile};

pub const SRC: &str = include_str!("../../shaders/argmax.wgsl");

/// Mirrors `Params` in argmax.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub vocab: u32,
    pub _p: [u32; 3],
}

/// Words of [`RowStats`] per row in the `stats` buffer.
pub const STATS_WORDS: usize = 4;

/// A logits row's finiteness, as the argmax kernel writes it next to the id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RowStats {
    pub nan: u32,
    pub inf: u32,
    /// The first non-finite index and the bits of its value.
    pub first: Option<(u32, u32)>,
}

impl RowStats {
    /// From the kernel's 4 words `[nan, inf, first (u32::MAX: none), bits]`.
    pub fn from_words(w: [u32; STATS_WORDS]) -> Self {
        RowStats {
            nan: w[0],
            inf: w[1],
            first: (w[2] != u32::MAX).then_some((w[2], w[3])),
        }
    }

    pub fn is_finite(&self) -> bool {
        self.first.is_none()
    }

    /// CPU reference (what the kernel computes for `row`).
    pub fn of(row: &[f32]) -> Self {
        RowStats {
            nan: row.iter().filter(|x| x.is_nan()).count() as u32,
            inf: row.iter().filter(|x| x.is_infinite()).count() as u32,
            first: row
                .iter()
                .position(|x| !x.is_finite())
                .map(|i| (i as u32, row[i].to_bits())),
        }
    }
}

/// The compiled argmax kernel (one workgroup per row).
pub struct Argmax {
    pub kernel: Kernel,
    /// Its workgroup size (the profile's or the `argmax_wg` decision's,
    /// capped by the adapter).
    pub wg: u32,
}

/// Bindings of one logits / output pair; built once at load.
pub struct ArgmaxBinding {
    pub params: wgpu::Buffer,
    pub bind: wgpu::BindGroup,
    pub vocab: usize,
    /// Rows the logits and output buffers can hold.
    pub max_tokens: u32,
}

/// The argmax workgroup size on a device: the `argmax_wg` shader decision
/// when set, else the profile's. CPU-type adapters run a workgroup as SIMD
/// lanes and pay for every barrier: a narrow workgroup keeps the tree short
/// (CPU-device profile, 64). GPUs want more invocations streaming the row
/// (256). Halved until it fits the adapter's invocation and workgroup
/// memory limits (five arrays of WG words).
pub fn workgroup(caps: &crate::gpu::Caps) -> u32 {
    let mut wg: u32 = match (caps.decisions.argmax_wg, caps.kernels) {
        (Some(wg), _) => wg,
        (None, KernelProfile::CpuDevice) => 64,
        (None, KernelProfile::Gpu) => 256,
    };
    while wg > 1 && (wg > caps.max_invocations || 20 * wg > caps.max_workgroup_storage) {
        wg /= 2;
    }
    wg
}

impl Argmax {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let wg = workgroup(&gpu.caps);
        let src = format!("const WG: u32 = {wg}u;\n{SRC}");
        let kernel = gpu.kernel("argmax", &src, "main", &[])?;
        Ok(Argmax { kernel, wg })
    }

    /// Bindings: `step`, `logits` f32 `[tokens, vocab]`, `out` u32 `[tokens]`,
    /// `stats` u32 `[tokens, STATS_WORDS]` (see [`RowStats`]).
    pub fn bind(
        &self,
        gpu: &Gpu,
        step: &wgpu::Buffer,
        logits: &wgpu::Buffer,
        vocab: usize,
        out: &wgpu::Buffer,
        stats: &wgpu::Buffer,
    ) -> Result<ArgmaxBinding> {
        if vocab == 0 || vocab > u32::MAX as usize {
            return Err(Error::invalid(format!(
                "argmax: vocab {vocab} out of range (1..={})",
                u32::MAX
            )));
        }
        let rows = (logits.size() / (4 * vocab as u64))
            .min(out.size() / 4)
            .min(stats.size() / (4 * STATS_WORDS as u64));
        if rows == 0 {
            return Err(Error::invalid(format!(
                "argmax: logits buffer ({} bytes) cannot hold one row of vocab {vocab}",
                logits.size()
            )));
        }
        let params = gpu.uniform(
            "argmax.params",
            &Params {
                vocab: vocab as u32,
                _p: [0; 3],
            },
        )?;
        let bind = gpu.bind(&self.kernel, &[&params, step, logits, out, stats]);
        Ok(ArgmaxBinding {
            params,
            bind,
            vocab,
            max_tokens: rows.min(u64::from(u32::MAX)) as u32,
        })
    }

    /// Record the argmax of `n_tokens` rows (must match the Step uniform).
    pub fn encode(
        &self,
        gpu: &Gpu,
        pass: &mut wgpu::ComputePass<'_>,
        b: &ArgmaxBinding,
        n_tokens: u32,
    ) -> Result<()> {
        if n_tokens > b.max_tokens {
            return Err(Error::invalid(format!(
                "argmax: {n_tokens} rows but the bound buffers hold {}",
                b.max_tokens
            )));
        }
        gpu.dispatch_in(pass, &self.kernel, &b.bind, n_tokens);
        Ok(())
    }
}

/// One-shot argmax of `logits` (`[rows, vocab]`) on the device.
#[cfg(not(target_arch = "wasm32"))]
pub fn argmax_once(gpu: &Gpu, logits: &[f32], vocab: usize) -> Result<Vec<u32>> {
    Ok(argmax_stats_once(gpu, logits, vocab)?.0)
}

/// One-shot argmax and [`RowStats`] of every row on the device.
#[cfg(not(target_arch = "wasm32"))]
pub fn argmax_stats_once(
    gpu: &Gpu,
    logits: &[f32],
    vocab: usize,
) -> Result<(Vec<u32>, Vec<RowStats>)> {
    if vocab == 0 || logits.is_empty() || logits.len() % vocab != 0 {
        return Err(Error::invalid(format!(
            "argmax: {} logits are not whole rows of vocab {vocab}",
            logits.len()
        )));
    }
    let rows = logits.len() / vocab;
    let op = Argmax::new(gpu)?;
    let step = gpu.uniform("argmax_once.step", &Step::new(rows as u32, 0))?;
    let lb = gpu.storage_init("argmax_once.logits", bytemuck::cast_slice(logits))?;
    let ob = gpu.storage("argmax_once.out", (rows * 4) as u64);
    let sb = gpu.storage("argmax_once.stats", (rows * 4 * STATS_WORDS) as u64);
    let b = op.bind(gpu, &step, &lb, vocab, &ob, &sb)?;
    let mut enc = gpu.encoder();
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("argmax_once"),
            timestamp_writes: None,
        });
        op.encode(gpu, &mut pass, &b, rows as u32)?;
    }
    gpu.submit_wait(enc)?;
    let ids = gpu.read_u32(&ob, rows)?;
    let words = gpu.read_u32(&sb, rows * STATS_WORDS)?;
    let stats = words
        .chunks_exact(STATS_WORDS)
        .map(|w| RowStats::from_words([w[0], w[1], w[2], w[3]]))
        .collect();
    Ok((ids, stats))
}

/// CPU reference: per row, the first index of the maximum, ignoring NaN;
/// 0 for a row of only NaN.
pub fn reference(logits: &[f32], vocab: usize) -> Vec<u32> {
    logits
        .chunks(vocab)
        .map(|row| {
            let mut best: Option<(usize, f32)> = None;
            for (i, &v) in row.iter().enumerate() {
                if v.is_nan() {
                    continue;
                }
                match best {
                    Some((_, b)) if v <= b => {}
                    _ => best = Some((i, v)),
                }
            }
            best.map_or(0, |(i, _)| i as u32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{gpu, rand_vec};

    fn check(logits: &[f32], vocab: usize, what: &str) {
        let (got, stats) = argmax_stats_once(gpu(), logits, vocab).unwrap();
        let want = reference(logits, vocab);
        assert_eq!(got, want, "{what}");
        let want: Vec<RowStats> = logits.chunks(vocab).map(RowStats::of).collect();
        assert_eq!(stats, want, "{what}: stats");
    }

    #[test]
    fn reference_semantics() {
        let nan = f32::NAN;
        let ninf = f32::NEG_INFINITY;
        assert_eq!(reference(&[1.0, 3.0, 3.0, 2.0], 4), [1]);
        assert_eq!(reference(&[nan, 1.0, nan, 0.5], 4), [1]);
        assert_eq!(reference(&[nan, nan], 2), [0]);
        assert_eq!(reference(&[ninf, ninf, ninf], 3), [0]);
        assert_eq!(reference(&[ninf, nan, -1e30], 3), [2]);
        assert_eq!(reference(&[0.0, -0.0, 0.0], 3), [0]);
    }

    #[test]
    fn qwen_vocab_rows() {
        // 151936 logits per row (Qwen2), three rows: random, max at the last
        // index, and max at index 0.
        let vocab = 151_936;
        let mut l = rand_vec(3 * vocab, 10.0, 1);
        l[vocab + vocab - 1] = 50.0;
        l[2 * vocab] = 50.0;
        check(&l, vocab, "vocab 151936");
        let got = argmax_once(gpu(), &l, vocab).unwrap();
        assert_eq!(&got[1..], &[vocab as u32 - 1, 0]);
    }

    #[test]
    fn ties_take_the_first_index() {
        // equal maxima spread so that different invocations (strides of the
        // workgroup) and different tree levels see them
        for vocab in [7usize, 64, 65, 300, 5000] {
            for positions in [[3usize, 5, 6], [1, 2, 3], [0, 64, 128], [65, 129, 4000]] {
                let mut l = rand_vec(vocab, 1.0, vocab as u64);
                let pos: Vec<usize> = positions.iter().copied().filter(|&i| i < vocab).collect();
                for &i in &pos {
                    l[i] = 2.0;
                }
                check(&l, vocab, &format!("ties {pos:?} vocab {vocab}"));
                if let Some(&first) = pos.first() {
                    assert_eq!(reference(&l, vocab), [first as u32]);
                }
            }
        }
    }

    #[test]
    fn nan_never_wins_and_edge_values() {
        let nan = f32::NAN;
        let ninf = f32::NEG_INFINITY;
        let vocab = 257;
        let mut rows = Vec::new();
        // NaN everywhere except one ordinary value
        let mut r = vec![nan; vocab];
        r[200] = -3.0;
        rows.push(r);
        // NaN mixed with large values; the max is not NaN
        let mut r = rand_vec(vocab, 1.0, 3);
        for i in (0..vocab).step_by(3) {
            r[i] = nan;
        }
        r[100] = 9.0;
        rows.push(r);
        // all -inf: first index
        rows.push(vec![ninf; vocab]);
        // all NaN: 0 by convention
        rows.push(vec![nan; vocab]);
        // +inf at the last index
        let mut r = rand_vec(vocab, 1.0, 4);
        r[vocab - 1] = f32::INFINITY;
        rows.push(r);
        let l: Vec<f32> = rows.concat();
        check(&l, vocab, "edge rows");
        assert_eq!(reference(&l, vocab), [200, 100, 0, 0, vocab as u32 - 1]);
    }

    #[test]
    fn small_vocabs_and_many_rows() {
        for vocab in [1usize, 2, 3, 63, 64, 65, 1000] {
            let l = rand_vec(17 * vocab, 1.0, vocab as u64 + 7);
            check(&l, vocab, &format!("vocab {vocab} x 17 rows"));
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let gpu = gpu();
        assert!(argmax_once(gpu, &[1.0; 10], 3).is_err());
        assert!(argmax_once(gpu, &[1.0; 10], 0).is_err());
        let op = Argmax::new(gpu).unwrap();
        let step = gpu.uniform("s", &Step::new(1, 0)).unwrap();
        let logits = gpu.storage("l", 4 * 10);
        let out = gpu.storage("o", 4);
        let stats = gpu.storage("s", 16);
        assert!(op.bind(gpu, &step, &logits, 11, &out, &stats).is_err());
        let b = op.bind(gpu, &step, &logits, 5, &out, &stats).unwrap();
        assert_eq!(b.max_tokens, 1);
        let out2 = gpu.storage("o2", 8);
        let b = op.bind(gpu, &step, &logits, 5, &out2, &stats).unwrap();
        assert_eq!(b.max_tokens, 1, "stats for one row only");
    }

    #[test]
    fn stats_count_and_locate_non_finite_logits() {
        let (nan, inf) = (f32::NAN, f32::INFINITY);
        let vocab = 1000;
        let mut rows = vec![rand_vec(vocab, 5.0, 11); 4];
        // row 1: one -inf late, NaN earlier at an index a later invocation
        // of the workgroup scans (not the first lane's)
        rows[1][977] = -inf;
        rows[1][301] = nan;
        // row 2: +inf at index 0, NaN at the end, several of each
        rows[2][0] = inf;
        rows[2][vocab - 1] = nan;
        rows[2][500] = nan;
        rows[2][64] = -inf;
        // row 3: a NaN with an unusual payload; its bits come back exactly
        rows[3][7] = f32::from_bits(0xffc0_1234);
        let l: Vec<f32> = rows.concat();
        check(&l, vocab, "non-finite rows");
        let (_, s) = argmax_stats_once(gpu(), &l, vocab).unwrap();
        assert!(s[0].is_finite());
        assert_eq!((s[1].nan, s[1].inf, s[1].first.unwrap().0), (1, 1, 301));
        assert_eq!(
            s[2],
            RowStats {
                nan: 2,
                inf: 2,
                first: Some((0, inf.to_bits()))
            }
        );
        assert_eq!(s[3].first, Some((7, 0xffc0_1234)));
        // f32::MAX and the smallest subnormal are finite
        let mut r = vec![f32::MAX, -f32::MAX, f32::from_bits(1), 0.0];
        r.resize(70, 1.0);
        let (_, s) = argmax_stats_once(gpu(), &r, 70).unwrap();
        assert!(s[0].is_finite(), "{s:?}");
    }
}
