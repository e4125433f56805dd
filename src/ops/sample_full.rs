//! Sampling on the GPU, whole: repetition penalty, temperature, top-k,
//! top-p, min-p and the draw run in `shaders/sample_full.wgsl`, and only the
//! chosen id (with a flag) comes back: 16 bytes instead of the row.
//!
//! For the same seed the id is the CPU sampler's (`crate::sampling`), which
//! the host guarantees as follows. The host draws the step's uniform `r`
//! from the sampler's RNG (the number the CPU draw would use) and passes it
//! in. Then:
//!
//! - The penalty is `l * penalty` for a negative logit and `l * (1 /
//!   penalty)` otherwise, `1 / penalty` rounded to f32 once on the host: a
//!   single correctly rounded f32 multiply, the same bits on every device
//!   and on the host (which uses the same rule). Results near the subnormal
//!   range, which a device may flush, set a flag instead.
//! - Greedy, top-k (with its ties: the order is value descending by
//!   `total_cmp`, then id ascending) and the order of the survivors use only
//!   comparisons of bit keys: exact.
//! - The probabilities are f32 here and f64 on the host. Every decision that
//!   rests on them (top-p's cut, each min-p floor comparison, the draw's
//!   interval) is taken only when it holds by a margin of [`TOL`] times an
//!   error bound the kernel accumulates with the sums: per probability,
//!   `(4 + 4|z|)` ulp for `exp(z)` (WGSL's `exp` is within `3 + 2|z|` ulp;
//!   rounding `x - max`, the f32 `1/t` and the product add `1.5|z|`), and
//!   for the sums `4 + log2(256)` ulp of the total (compensated per-lane
//!   partials, then a tree). Within that bound the host's f64 decision is
//!   the same. Otherwise the kernel flags the step (`uncertain`) and the
//!   caller samples that step on the host from the row, with the same `r`:
//!   the id is the CPU sampler's either way. Such steps are those where `r`
//!   (or top-p) lands within about 1e-6 of a boundary between two tokens'
//!   cumulative probabilities, or where a tie sits exactly on top-p's cut;
//!   the tests count them.
//!
//! Top-p and the draw find their cut without sorting: a bisection on the
//! key (32 steps) and then on the id among ties (log2 vocab steps), each
//! step one reduction over the top-k survivors, which the kernel first
//! compacts into a list (so top-k = 40 scans 40 entries, not the row). The
//! list starts with its head, the survivors within 16 temperature-scaled
//! logits of the maximum (a key threshold, so a prefix of the order): a
//! cut whose goal falls within the head's mass, as a language model's
//! top-p nucleus and draw nearly always do, is searched in the head alone,
//! and the row is scanned only a handful of times per step.

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel};

pub const SRC: &str = include_str!("../../shaders/sample_full.wgsl");

/// Safety factor on the kernel's error bounds: a sum-based decision must
/// clear twice the bound (see the module doc).
pub const TOL: f32 = 2.0;
/// Smallest min-p the kernel takes (a smaller nonzero floor compares
/// probabilities that f32 `exp` underflows).
pub const MIN_P_FLOOR: f32 = 1e-30;
/// Most distinct ids of the penalty window the kernel's window buffer holds.
pub const MAX_WINDOW: usize = 4096;
/// u32 words of the output.
pub const OUT_WORDS: usize = 4;

/// Why a step was not decided on the GPU (bits of [`Picked::why`]).
pub const U_TINY: u32 = 1;
pub const U_TOP_P: u32 = 2;
pub const U_MIN_P: u32 = 4;
pub const U_DRAW: u32 = 8;

/// Mirrors `Params` in sample_full.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub vocab: u32,
    pub n_window: u32,
    pub top_k: u32,
    pub greedy: u32,
    pub inv_t: f32,
    pub top_p: f32,
    pub min_p: f32,
    pub penalty: f32,
    pub inv_penalty: f32,
    pub r: f32,
    pub tol: f32,
    pub id_steps: u32,
}

/// One step's sampling settings, as the kernel takes them (the sampler
/// builds it; this module knows nothing above `ops`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Draw {
    /// 0 = greedy (the argmax of the penalized row; `r` unused).
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub penalty: f32,
    /// The step's uniform in [0, 1), from the sampler's RNG.
    pub r: f64,
}

impl Draw {
    /// Whether the kernel can take these settings with `window` ids.
    pub fn supported(&self, window: usize) -> bool {
        window <= MAX_WINDOW
            && (self.min_p == 0.0 || self.min_p >= MIN_P_FLOOR)
            && self.penalty > 0.0
            && self.penalty.is_finite()
            && (1.0 / self.penalty).is_finite()
            && self.top_k <= u32::MAX as usize
    }
}

/// What a step read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Picked {
    /// The chosen id (meaningless when `why != 0`).
    pub id: u32,
    /// 0: decided on the GPU; else the `U_*` bits of the undecided checks.
    pub why: u32,
    /// Tokens that survived top-k, and that the draw chose among.
    pub survivors: u32,
    pub drawn_from: u32,
}

impl Picked {
    pub fn from_words(w: &[u32]) -> Self {
        Picked {
            id: w[0],
            why: w[1],
            survivors: w[2],
            drawn_from: w[3],
        }
    }

    pub fn uncertain(&self) -> bool {
        self.why != 0
    }
}

/// The compiled kernel (one workgroup).
pub struct GpuSampler {
    pub kernel: Kernel,
}

/// Bindings of one logits row; built once at load. The host writes
/// `params` and `window` per step (no allocation).
pub struct SampleBinding {
    pub params: wgpu::Buffer,
    pub window: wgpu::Buffer,
    pub work: wgpu::Buffer,
    pub out: wgpu::Buffer,
    pub bind: wgpu::BindGroup,
    pub vocab: usize,
}

impl GpuSampler {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        // One workgroup: as wide as the adapter allows, up to 256.
        let mut wg: u32 = 256;
        while wg > gpu.caps.max_invocations.max(1) {
            wg /= 2;
        }
        let src = format!("const WG: u32 = {wg}u;\n{SRC}");
        let kernel = gpu.kernel("sample_full", &src, "main", &[])?;
        Ok(GpuSampler { kernel })
    }

    /// Bind row 0 of `logits` (`vocab` wide).
    pub fn bind(&self, gpu: &Gpu, logits: &wgpu::Buffer, vocab: usize) -> Result<SampleBinding> {
        if vocab == 0 || (vocab as u64) * 4 > logits.size() || vocab >= (u32::MAX / 4) as usize {
            return Err(Error::invalid(format!(
                "GPU sampler: vocab {vocab} does not fit the logits buffer ({} bytes)",
                logits.size()
            )));
        }
        let params = gpu.uniform("sample_full.params", &Self::params(vocab, 0, &GREEDY))?;
        let window = gpu.storage("sample_full.window", (MAX_WINDOW * 4) as u64);
        let work = gpu.storage("sample_full.work", (vocab * 16) as u64);
        let out = gpu.storage("sample_full.out", (OUT_WORDS * 4) as u64);
        let bind = gpu.bind(&self.kernel, &[&params, logits, &window, &work, &out]);
        Ok(SampleBinding {
            params,
            window,
            work,
            out,
            bind,
            vocab,
        })
    }

    fn params(vocab: usize, n_window: usize, d: &Draw) -> Params {
        let t = d.temperature.max(1e-6);
        let v = vocab as u32;
        Params {
            vocab: v,
            n_window: n_window as u32,
            top_k: d.top_k as u32,
            greedy: (d.temperature == 0.0) as u32,
            inv_t: 1.0 / t,
            top_p: d.top_p,
            min_p: d.min_p,
            penalty: d.penalty,
            inv_penalty: 1.0 / d.penalty,
            r: d.r as f32,
            tol: TOL,
            // enough halvings to narrow 0..vocab to one id, and one more
            id_steps: u32::BITS - v.leading_zeros() + 1,
        }
    }

    /// Write this step's settings and penalty window (distinct ids, in the
    /// vocabulary) before the pass is submitted.
    pub fn prepare(&self, gpu: &Gpu, b: &SampleBinding, d: &Draw, window: &[u32]) -> Result<()> {
        if !d.supported(window.len()) {
            return Err(Error::invalid(format!(
                "GPU sampler: settings {d:?} with {} window ids are not supported \
                 (at most {MAX_WINDOW} ids, min-p 0 or >= {MIN_P_FLOOR})",
                window.len()
            )));
        }
        if let Some(&bad) = window.iter().find(|&&t| t as usize >= b.vocab) {
            return Err(Error::invalid(format!(
                "GPU sampler: window id {bad} is outside the vocabulary ({})",
                b.vocab
            )));
        }
        let p = Self::params(b.vocab, window.len(), d);
        gpu.queue.write_buffer(&b.params, 0, bytemuck::bytes_of(&p));
        if !window.is_empty() {
            gpu.queue
                .write_buffer(&b.window, 0, bytemuck::cast_slice(window));
        }
        Ok(())
    }

    pub fn encode(&self, gpu: &Gpu, pass: &mut wgpu::ComputePass<'_>, b: &SampleBinding) {
        gpu.dispatch_in(pass, &self.kernel, &b.bind, 1);
    }
}

const GREEDY: Draw = Draw {
    temperature: 0.0,
    top_k: 0,
    top_p: 1.0,
    min_p: 0.0,
    penalty: 1.0,
    r: 0.0,
};

/// One-shot sampling of one row on the device (tests).
#[cfg(not(target_arch = "wasm32"))]
pub fn sample_once(gpu: &Gpu, logits: &[f32], d: &Draw, window: &[u32]) -> Result<Picked> {
    let op = GpuSampler::new(gpu)?;
    let lb = gpu.storage_init("sample_full_once.logits", bytemuck::cast_slice(logits))?;
    let b = op.bind(gpu, &lb, logits.len())?;
    op.prepare(gpu, &b, d, window)?;
    let mut enc = gpu.encoder();
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("sample_full_once"),
            timestamp_writes: None,
        });
        op.encode(gpu, &mut pass, &b);
    }
    gpu.submit_wait(enc)?;
    let w = gpu.read_u32(&b.out, OUT_WORDS)?;
    Ok(Picked::from_words(&w))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testutil::{gpu, rand_vec};

    /// The kernel bound once to a row buffer of `vocab` logits (also used
    /// by `sampling`'s tests, which hold it to the CPU sampler).
    pub(crate) struct Rig {
        op: GpuSampler,
        lb: wgpu::Buffer,
        b: SampleBinding,
    }

    impl Rig {
        pub(crate) fn new(vocab: usize) -> Rig {
            let g = gpu();
            let op = GpuSampler::new(g).unwrap();
            let lb = g.storage("rig.logits", (vocab * 4) as u64);
            let b = op.bind(g, &lb, vocab).unwrap();
            Rig { op, lb, b }
        }

        pub(crate) fn run(&self, logits: &[f32], d: &Draw, window: &[u32]) -> Picked {
            let g = gpu();
            g.queue
                .write_buffer(&self.lb, 0, bytemuck::cast_slice(logits));
            self.op.prepare(g, &self.b, d, window).unwrap();
            let mut enc = g.encoder();
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("rig"),
                    timestamp_writes: None,
                });
                self.op.encode(g, &mut pass, &self.b);
            }
            g.submit_wait(enc).unwrap();
            Picked::from_words(&g.read_u32(&self.b.out, OUT_WORDS).unwrap())
        }
    }

    fn draw(temperature: f32, top_k: usize, r: f64) -> Draw {
        Draw {
            temperature,
            top_k,
            top_p: 1.0,
            min_p: 0.0,
            penalty: 1.0,
            r,
        }
    }

    #[test]
    fn ties_non_finite_and_signed_zeros_follow_the_host() {
        let rig = Rig::new(3000);
        // a flat row: top-k keeps the smallest ids, greedy the first
        let flat = vec![1.5f32; 3000];
        let pk = rig.run(&flat, &draw(1.0, 5, 0.99), &[]);
        assert_eq!((pk.id, pk.why, pk.survivors, pk.drawn_from), (4, 0, 5, 5));
        let pk = rig.run(&flat, &draw(1.0, 5, 0.0), &[]);
        assert_eq!((pk.id, pk.why), (0, 0));
        assert_eq!(rig.run(&flat, &draw(0.0, 0, 0.0), &[]).id, 0);
        // NaN and infinities never drawn; greedy: NaN never wins, -0 == +0
        let mut l = rand_vec(3000, 1.0, 5);
        l[7] = f32::NAN;
        l[8] = f32::INFINITY;
        l[9] = f32::NEG_INFINITY;
        l[10] = 30.0;
        let pk = rig.run(&l, &draw(1.0, 0, 0.5), &[]);
        assert_eq!((pk.id, pk.why, pk.survivors), (10, 0, 2997));
        let mut z = vec![-1.0f32; 3000];
        z[20] = -0.0;
        z[21] = 0.0;
        assert_eq!(rig.run(&z, &draw(0.0, 0, 0.0), &[]).id, 20);
        // the sampler's order puts +0 before -0 (total_cmp): top-1 is 21
        assert_eq!(rig.run(&z, &draw(1.0, 1, 0.3), &[]).id, 21);
        // all -inf / NaN: 0, as the host
        let dead = vec![f32::NEG_INFINITY; 3000];
        assert_eq!(rig.run(&dead, &draw(0.0, 0, 0.0), &[]).id, 0);
        assert_eq!(rig.run(&dead, &draw(1.0, 0, 0.5), &[]).id, 0);
    }

    #[test]
    fn bad_settings_are_errors() {
        let g = gpu();
        let l = vec![0.0f32; 10];
        let mut d = draw(1.0, 0, 0.5);
        let err = |d: &Draw, w: &[u32]| sample_once(g, &l, d, w).unwrap_err().to_string();
        assert!(err(&d, &[10]).contains("window id 10 is outside"));
        assert!(err(&d, &vec![0; MAX_WINDOW + 1]).contains("not supported"));
        d.min_p = 1e-35;
        assert!(err(&d, &[]).contains("not supported"));
        d.min_p = 0.0;
        // ten equal tokens: r = 0.55 is decided (0.5 would sit on a boundary)
        d.r = 0.55;
        assert_eq!(
            sample_once(g, &l, &d, &[3]).unwrap(),
            Picked {
                id: 5,
                why: 0,
                survivors: 10,
                drawn_from: 10
            }
        );
        d.r = 0.5;
        assert_eq!(sample_once(g, &l, &d, &[3]).unwrap().why, U_DRAW);
    }
}
