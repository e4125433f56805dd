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
//!
//! Nothing is written per step in a generation ([`GpuSampler::begin`]):
//! the window is the tail of a history ring on the GPU that the kernel
//! appends each pick to, and the uniforms are a table drawn up front from
//! the sampler's RNG in the CPU sampler's order, indexed by a step counter
//! the kernel advances. A step the host decides otherwise (an uncertain
//! pick) is written back with [`GpuSampler::fix`].

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel};

pub const SRC: &str = include_str!("../../shaders/sample_full.wgsl");
/// The bit keys both sampling kernels order logits by (prepended to each).
pub const KEYS: &str = include_str!("../../shaders/sample_keys.wgsl");

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
    pub last_n: u32,
    pub top_k: u32,
    pub greedy: u32,
    pub inv_t: f32,
    pub top_p: f32,
    pub min_p: f32,
    pub penalty: f32,
    pub inv_penalty: f32,
    pub tol: f32,
    pub id_steps: u32,
    pub penalize: u32,
    pub hist_cap: u32,
    pub n_draws: u32,
    pub _pad: [u32; 2],
}

/// u32 words of `seq` before its history ring (see sample_full.wgsl).
const SEQ_HEAD: usize = 4;

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
/// `params`, `seq` and `draws` once per generation ([`GpuSampler::begin`]),
/// or per call in the one-step API ([`GpuSampler::prepare`]).
pub struct SampleBinding {
    pub params: wgpu::Buffer,
    /// The history ring and its counters (see sample_full.wgsl).
    pub seq: wgpu::Buffer,
    /// The uniforms of a generation's steps (f32).
    pub draws: wgpu::Buffer,
    pub work: wgpu::Buffer,
    pub out: wgpu::Buffer,
    pub bind: wgpu::BindGroup,
    pub vocab: usize,
    /// Rows of `vocab` logits the bound buffer holds (see [`GpuSampler::set_row`]).
    pub rows: usize,
    /// Tokens the history ring holds, uniforms the table holds.
    pub hist_cap: usize,
    pub n_draws: usize,
}

impl GpuSampler {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        // One workgroup: as wide as the adapter allows, up to 256.
        let mut wg: u32 = 256;
        while wg > gpu.caps.max_invocations.max(1) {
            wg /= 2;
        }
        let src = format!("const WG: u32 = {wg}u;\n{KEYS}{SRC}");
        let kernel = gpu.kernel("sample_full", &src, "main", &[])?;
        Ok(GpuSampler { kernel })
    }

    /// Bind `logits` (rows of `vocab`; row 0 sampled unless
    /// [`Self::set_row`] says otherwise), with a history ring of
    /// `hist_cap` tokens (at least [`MAX_WINDOW`]) and a table of `n_draws`
    /// uniforms (the most steps of one generation).
    pub fn bind(
        &self,
        gpu: &Gpu,
        logits: &wgpu::Buffer,
        vocab: usize,
        hist_cap: usize,
        n_draws: usize,
    ) -> Result<SampleBinding> {
        if vocab == 0 || (vocab as u64) * 4 > logits.size() || vocab >= (u32::MAX / 4) as usize {
            return Err(Error::invalid(format!(
                "GPU sampler: vocab {vocab} does not fit the logits buffer ({} bytes)",
                logits.size()
            )));
        }
        let hist_cap = hist_cap.max(MAX_WINDOW);
        let n_draws = n_draws.max(1);
        if hist_cap >= (u32::MAX / 8) as usize || n_draws >= (u32::MAX / 8) as usize {
            return Err(Error::invalid(format!(
                "GPU sampler: a history of {hist_cap} tokens or {n_draws} steps is too long"
            )));
        }
        let p = Self::params(vocab, None, hist_cap, n_draws, &GREEDY);
        let params = gpu.uniform("sample_full.params", &p)?;
        let seq = gpu.storage("sample_full.seq", ((SEQ_HEAD + hist_cap) * 4) as u64);
        let draws = gpu.storage("sample_full.draws", (n_draws * 4) as u64);
        let work = gpu.storage("sample_full.work", (vocab * 16) as u64);
        let out = gpu.storage("sample_full.out", (OUT_WORDS * 4) as u64);
        let bind = gpu.bind(&self.kernel, &[&params, logits, &seq, &draws, &work, &out]);
        Ok(SampleBinding {
            params,
            seq,
            draws,
            work,
            out,
            bind,
            vocab,
            rows: (logits.size() / (vocab as u64 * 4)) as usize,
            hist_cap,
            n_draws,
        })
    }

    /// Sample row `row` of the bound logits (`[rows, vocab]`) from the next
    /// pass on (row 0 until set; [`Self::begin`] and [`Self::prepare`] set
    /// it back to 0). A batched step of several sequences sets each
    /// sequence's row before its submission: 4 bytes, no allocation.
    pub fn set_row(&self, gpu: &Gpu, b: &SampleBinding, row: usize) -> Result<()> {
        if row >= b.rows {
            return Err(Error::invalid(format!(
                "GPU sampler: logits row {row} is outside the bound buffer ({} rows of {})",
                b.rows, b.vocab
            )));
        }
        gpu.queue
            .write_buffer(&b.seq, 8, bytemuck::bytes_of(&(row as u32)));
        Ok(())
    }

    /// The kernel's settings: `last_n` None for no penalty, Some(0) for a
    /// window over the whole history.
    fn params(vocab: usize, last_n: Option<usize>, cap: usize, n_draws: usize, d: &Draw) -> Params {
        let t = d.temperature.max(1e-6);
        let v = vocab as u32;
        Params {
            vocab: v,
            last_n: last_n.unwrap_or(0).min(cap) as u32,
            top_k: d.top_k as u32,
            greedy: (d.temperature == 0.0) as u32,
            inv_t: 1.0 / t,
            top_p: d.top_p,
            min_p: d.min_p,
            penalty: d.penalty,
            inv_penalty: 1.0 / d.penalty,
            tol: TOL,
            // enough halvings to narrow 0..vocab to one id, and one more
            id_steps: u32::BITS - v.leading_zeros() + 1,
            penalize: last_n.is_some() as u32,
            hist_cap: cap as u32,
            n_draws: n_draws as u32,
            _pad: [0; 2],
        }
    }

    fn check(b: &SampleBinding, d: &Draw, window: usize, ids: &[u32]) -> Result<()> {
        if !d.supported(window) || window > b.hist_cap {
            return Err(Error::invalid(format!(
                "GPU sampler: settings {d:?} with a window of {window} ids are not supported \
                 (at most {MAX_WINDOW} ids, min-p 0 or >= {MIN_P_FLOOR})"
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= b.vocab) {
            return Err(Error::invalid(format!(
                "GPU sampler: window id {bad} is outside the vocabulary ({})",
                b.vocab
            )));
        }
        Ok(())
    }

    /// One step on its own: write `d` (its uniform `r` included) and the
    /// penalty window (distinct ids, in the vocabulary) before the pass is
    /// submitted. Writes the whole state each call; a generation uses
    /// [`Self::begin`] once instead.
    pub fn prepare(&self, gpu: &Gpu, b: &SampleBinding, d: &Draw, window: &[u32]) -> Result<()> {
        Self::check(b, d, window.len(), window)?;
        let last_n = (!window.is_empty()).then_some(0);
        Self::write_state(gpu, b, d, last_n, window, &[d.r as f32]);
        Ok(())
    }

    /// Write the settings, a history of `tail` (the window's tokens) with
    /// the step counter at 0, and the uniforms `draws`.
    fn write_state(
        gpu: &Gpu,
        b: &SampleBinding,
        d: &Draw,
        last_n: Option<usize>,
        tail: &[u32],
        draws: &[f32],
    ) {
        let p = Self::params(b.vocab, last_n, b.hist_cap, b.n_draws, d);
        gpu.queue.write_buffer(&b.params, 0, bytemuck::bytes_of(&p));
        let head = [tail.len() as u32, 0, 0, 0];
        gpu.queue
            .write_buffer(&b.seq, 0, bytemuck::cast_slice(&head));
        if !tail.is_empty() {
            let off = (SEQ_HEAD * 4) as u64;
            gpu.queue
                .write_buffer(&b.seq, off, bytemuck::cast_slice(tail));
        }
        if !draws.is_empty() {
            gpu.queue
                .write_buffer(&b.draws, 0, bytemuck::cast_slice(draws));
        }
    }

    /// The most history tokens the window of a generation of `steps` steps
    /// after `history` tokens reads (`last_n` as in [`Self::begin`]).
    pub fn max_window(last_n: Option<usize>, history: usize, steps: usize) -> usize {
        match last_n {
            None => 0,
            Some(0) => history + steps,
            Some(n) => n.min(history + steps),
        }
    }

    /// Set up a generation of up to `steps` steps after `history`: the
    /// settings `d` (its `r` unused), the penalty window (`last_n` None: no
    /// penalty; Some(0): the whole history; Some(n): the last n tokens) and
    /// the steps' uniforms `draws` (none for greedy), written once. The
    /// kernel then appends each pick to the history and takes the next
    /// uniform itself. `spare` ring entries are kept for steps a caller
    /// discards (they append too). Returns the ring index of the first
    /// pick (for [`Self::fix`]).
    #[allow(clippy::too_many_arguments)]
    pub fn begin(
        &self,
        gpu: &Gpu,
        b: &SampleBinding,
        d: &Draw,
        last_n: Option<usize>,
        history: &[u32],
        steps: usize,
        draws: &[f32],
        spare: usize,
    ) -> Result<usize> {
        let window = Self::max_window(last_n, history.len(), steps);
        if window + spare > b.hist_cap {
            return Err(Error::invalid(format!(
                "GPU sampler: a penalty window of {window} tokens does not fit its history ring \
                 ({} tokens)",
                b.hist_cap - spare.min(b.hist_cap)
            )));
        }
        if draws.len() > b.n_draws || (d.temperature != 0.0 && draws.len() < steps) {
            return Err(Error::invalid(format!(
                "GPU sampler: {} uniforms for {steps} steps (the table holds {})",
                draws.len(),
                b.n_draws
            )));
        }
        let tail = match last_n {
            None => &[][..],
            Some(0) => history,
            Some(n) => &history[history.len().saturating_sub(n)..],
        };
        Self::check(b, d, 0, tail)?;
        Self::write_state(gpu, b, d, last_n, tail, draws);
        Ok(tail.len())
    }

    /// Step `step` of a generation picked `id` (the host's decision, in
    /// place of the kernel's): write it at ring index `at` (the return of
    /// [`Self::begin`] plus `step`) and set the counters to the step after
    /// it, as the kernel would have left them. Steps that ran after it are
    /// the caller's to discard.
    pub fn fix(&self, gpu: &Gpu, b: &SampleBinding, at: usize, step: usize, id: u32) -> Result<()> {
        if id as usize >= b.vocab {
            return Err(Error::invalid(format!(
                "GPU sampler: id {id} is outside the vocabulary ({})",
                b.vocab
            )));
        }
        let off = ((SEQ_HEAD + at % b.hist_cap) * 4) as u64;
        gpu.queue.write_buffer(&b.seq, off, bytemuck::bytes_of(&id));
        let head = [at as u32 + 1, step as u32 + 1];
        gpu.queue
            .write_buffer(&b.seq, 0, bytemuck::cast_slice(&head));
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
    let b = op.bind(gpu, &lb, logits.len(), MAX_WINDOW, 1)?;
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
            let b = op.bind(g, &lb, vocab, MAX_WINDOW, 64).unwrap();
            Rig { op, lb, b }
        }

        pub(crate) fn run(&self, logits: &[f32], d: &Draw, window: &[u32]) -> Picked {
            self.op.prepare(gpu(), &self.b, d, window).unwrap();
            self.step(logits)
        }
    }

    impl Rig {
        /// A generation's state, as [`GpuSampler::begin`] writes it.
        /// Returns the ring index of the first pick.
        pub(crate) fn begin(
            &self,
            d: &Draw,
            last_n: Option<usize>,
            history: &[u32],
            draws: &[f32],
        ) -> usize {
            let g = gpu();
            let steps = draws.len().max(8);
            self.op
                .begin(g, &self.b, d, last_n, history, steps, draws, 0)
                .unwrap()
        }

        /// One step of it on `logits`: nothing but the row is written.
        pub(crate) fn step(&self, logits: &[f32]) -> Picked {
            let g = gpu();
            g.queue
                .write_buffer(&self.lb, 0, bytemuck::cast_slice(logits));
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

        pub(crate) fn fix(&self, at: usize, step: usize, id: u32) {
            self.op.fix(gpu(), &self.b, at, step, id).unwrap();
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

    /// A row of a multi-row buffer (`set_row`) samples as that row alone.
    #[test]
    fn a_set_row_samples_that_row_of_the_buffer() {
        let g = gpu();
        let vocab = 2000;
        let rows: Vec<Vec<f32>> = (0..3).map(|i| rand_vec(vocab, 3.0, 40 + i)).collect();
        let flat: Vec<f32> = rows.concat();
        let op = GpuSampler::new(g).unwrap();
        let lb = g
            .storage_init("rows.logits", bytemuck::cast_slice(&flat))
            .unwrap();
        let b = op.bind(g, &lb, vocab, MAX_WINDOW, 4).unwrap();
        assert_eq!(b.rows, 3);
        let d = Draw {
            top_p: 0.9,
            ..draw(0.8, 0, 0.0)
        };
        // four steps per row, each with its own uniform from the table
        let draws = [0.13f32, 0.71, 0.42, 0.97];
        for (k, row) in rows.iter().enumerate() {
            op.begin(g, &b, &d, None, &[], 4, &draws, 0).unwrap();
            op.set_row(g, &b, k).unwrap();
            for &r in &draws {
                let mut enc = g.encoder();
                {
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    op.encode(g, &mut pass, &b);
                }
                g.submit_wait(enc).unwrap();
                let got = Picked::from_words(&g.read_u32(&b.out, OUT_WORDS).unwrap());
                let alone = sample_once(g, row, &Draw { r: r as f64, ..d }, &[]).unwrap();
                assert_eq!(got, alone, "row {k}, r {r}");
            }
        }
        let err = op.set_row(g, &b, 3).unwrap_err().to_string();
        assert!(err.contains("row 3 is outside"), "{err}");
    }

    #[test]
    fn bad_settings_are_errors() {
        let g = gpu();
        let l = vec![0.0f32; 10];
        let mut d = draw(1.0, 0, 0.5);
        let err = |d: &Draw, w: &[u32]| sample_once(g, &l, d, w).unwrap_err().to_string();
        assert!(err(&d, &[10]).contains("window id 10 is outside"));
        assert!(err(&d, &vec![0; MAX_WINDOW + 1]).contains("window of 4097 ids"));
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
