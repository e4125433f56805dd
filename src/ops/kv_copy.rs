//! Append a step's K (after RoPE) and V rows to one layer's KV cache.
//!
//! New rows are f32 `[n_tokens, n_kv_heads * head_dim]` (the k/v projection
//! layout); the cache is f32 `[n_kv_heads, max_ctx, head_dim]`, head-major so
//! one head's positions are contiguous for attention. Token `t` of the step
//! goes to position `pos_offset + t`.

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel, Step};

pub const SRC: &str = include_str!("../../shaders/kv_copy.wgsl");
const WG: u32 = 64;

/// One row of a batched step: the KV slot the row's sequence owns and the
/// row's position in that sequence (a `vec4<u32>` of the uniform array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RowPos {
    pub slot: u32,
    pub pos: u32,
    pub _p: [u32; 2],
}

/// Bytes of the batched step uniform for `max_rows` rows: a [`Step`]
/// followed by one [`RowPos`] per row (see [`rows_prelude`]).
pub fn batch_step_bytes(max_rows: u32) -> u64 {
    std::mem::size_of::<Step>() as u64 + max_rows as u64 * 16
}

/// WGSL prelude of the position-aware kernels (rope, rope_kv, kv_copy,
/// attention): the type of their step uniform (`StepT`) and where row `t`
/// sits (`row_pos`, `row_slot`). `None`: the plain [`Step`], row t at
/// `pos_offset + t` of slot 0, exactly the arithmetic of a single sequence.
/// `Some(n)`: a batched step (a `Step` then `n` [`RowPos`]), each row at its
/// own position in its own KV slot; the slot's region of a cache buffer
/// starts at `slot * n_kv_heads * max_ctx * head_dim`.
pub fn rows_prelude(max_rows: Option<u32>) -> String {
    match max_rows {
        None => "alias StepT = Step;\n\
                 fn row_pos(t: u32) -> u32 { return step.pos_offset + t; }\n\
                 fn row_slot(t: u32) -> u32 { return 0u; }\n"
            .to_string(),
        Some(n) => format!(
            "struct BatchStep {{ n_tokens: u32, pos_offset: u32, kv_len: u32, zero: u32, \
             rows: array<vec4<u32>, {n}>, }}\n\
             alias StepT = BatchStep;\n\
             fn row_pos(t: u32) -> u32 {{ return step.rows[t].y; }}\n\
             fn row_slot(t: u32) -> u32 {{ return step.rows[t].x; }}\n",
            n = n.max(1)
        ),
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub max_ctx: u32,
    pub _p: u32,
}

impl Params {
    pub fn new(n_kv_heads: usize, head_dim: usize, max_ctx: usize) -> Result<Self> {
        if n_kv_heads == 0 || head_dim == 0 || max_ctx == 0 {
            return Err(Error::invalid(format!(
                "kv cache: n_kv_heads ({n_kv_heads}), head_dim ({head_dim}) and max_ctx ({max_ctx}) must be positive"
            )));
        }
        if n_kv_heads as u64 * max_ctx as u64 * head_dim as u64 > u32::MAX as u64 {
            return Err(Error::invalid(format!(
                "kv cache: {n_kv_heads} heads x {max_ctx} positions x {head_dim} exceeds 2^32 elements"
            )));
        }
        Ok(Params {
            n_kv_heads: n_kv_heads as u32,
            head_dim: head_dim as u32,
            max_ctx: max_ctx as u32,
            _p: 0,
        })
    }

    /// Bytes of one cache buffer (K or V) of one layer.
    pub fn cache_bytes(&self) -> u64 {
        self.n_kv_heads as u64 * self.max_ctx as u64 * self.head_dim as u64 * 4
    }

    /// Host-side check that a step fits in the cache (the kernel also never
    /// writes past `max_ctx`, but silently).
    pub fn check_step(&self, step: &Step) -> Result<()> {
        let end = step.pos_offset as u64 + step.n_tokens as u64;
        if end > self.max_ctx as u64 {
            return Err(Error::invalid(format!(
                "kv cache: positions {}..{end} do not fit in the cache of {} positions",
                step.pos_offset, self.max_ctx
            )));
        }
        Ok(())
    }
}

/// One layer's K and V cache buffers, f32 `[slots, n_kv_heads, max_ctx,
/// head_dim]`: one region per sequence slot (slot 0 first).
pub struct KvCache {
    pub k: wgpu::Buffer,
    pub v: wgpu::Buffer,
    pub params: Params,
    /// Sequence slots (regions of `params.cache_bytes()` each).
    pub slots: u32,
}

impl KvCache {
    /// Allocate zeroed K and V buffers; errors when one does not fit in a
    /// storage binding (attention binds each whole).
    pub fn new(gpu: &Gpu, params: Params) -> Result<Self> {
        Self::with_slots(gpu, params, 1)
    }

    /// [`KvCache::new`] with `slots` regions per buffer.
    pub fn with_slots(gpu: &Gpu, params: Params, slots: usize) -> Result<Self> {
        check_cache_fits(gpu, &params)?;
        let total = (slots.max(1) as u64)
            .checked_mul(params.cache_bytes())
            .filter(|&b| b <= gpu.caps.max_binding)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "kv cache: {slots} sequence slots x {} bytes per layer for K (and V) exceed the \
                     device's max storage binding of {} bytes; use fewer slots or a shorter context",
                    params.cache_bytes(),
                    gpu.caps.max_binding
                ))
            })?;
        Ok(KvCache {
            k: gpu.storage("k cache", total),
            v: gpu.storage("v cache", total),
            params,
            slots: slots.max(1) as u32,
        })
    }
}

/// A per-layer cache buffer must be bindable whole.
pub fn check_cache_fits(gpu: &Gpu, params: &Params) -> Result<()> {
    let bytes = params.cache_bytes();
    if bytes > gpu.caps.max_binding {
        return Err(Error::invalid(format!(
            "kv cache: {} kv heads x {} positions x head_dim {} in f32 is {bytes} bytes per layer for K (and V), \
             above the device's max storage binding of {} bytes; use a context of at most {} positions",
            params.n_kv_heads,
            params.max_ctx,
            params.head_dim,
            gpu.caps.max_binding,
            gpu.caps.max_binding / (params.n_kv_heads as u64 * params.head_dim as u64 * 4)
        )));
    }
    Ok(())
}

/// The compiled K/V append kernel.
pub struct KvCopy {
    pub kernel: Kernel,
}

impl KvCopy {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        Self::with_rows(gpu, None)
    }

    /// The kernel for a step of [`rows_prelude`]'s kind (`Some(n)`: batched
    /// rows, each in its own slot at its own position).
    pub fn with_rows(gpu: &Gpu, max_rows: Option<u32>) -> Result<Self> {
        let src = format!("{}{SRC}", rows_prelude(max_rows));
        let kernel = gpu.kernel("kv_copy", &src, "main", &[("WG", WG as f64)])?;
        Ok(KvCopy { kernel })
    }

    /// Bindings: params (created here), step, k_new, v_new `[n_tokens,
    /// n_kv_heads * head_dim]`, the layer's cache. Build once at load.
    pub fn bind(
        &self,
        gpu: &Gpu,
        step: &wgpu::Buffer,
        k_new: &wgpu::Buffer,
        v_new: &wgpu::Buffer,
        cache: &KvCache,
    ) -> Result<wgpu::BindGroup> {
        let p = &cache.params;
        check_cache_fits(gpu, p)?;
        let bytes = p.cache_bytes();
        if cache.k.size() < bytes || cache.v.size() < bytes {
            return Err(Error::invalid(format!(
                "kv cache: buffers of {} / {} bytes, expected {bytes}",
                cache.k.size(),
                cache.v.size()
            )));
        }
        let row = p.n_kv_heads as u64 * p.head_dim as u64 * 4;
        if k_new.size() < row || v_new.size() < row {
            return Err(Error::invalid(format!(
                "kv copy: new K ({} bytes) / V ({} bytes) must hold at least one row of {row} bytes",
                k_new.size(),
                v_new.size()
            )));
        }
        let ub = gpu.uniform("kv_copy params", p)?;
        Ok(gpu.bind(&self.kernel, &[&ub, step, k_new, v_new, &cache.k, &cache.v]))
    }

    /// One invocation per (token, kv head, element).
    pub fn encode(
        &self,
        gpu: &Gpu,
        pass: &mut wgpu::ComputePass<'_>,
        bind: &wgpu::BindGroup,
        params: &Params,
        n_tokens: u32,
    ) {
        let items = n_tokens as u64 * params.n_kv_heads as u64 * params.head_dim as u64;
        let n = items.div_ceil(WG as u64) as u32;
        gpu.dispatch_in(pass, &self.kernel, bind, n);
    }
}

/// CPU reference: write `k_new`/`v_new` rows into the caches in place.
pub fn reference(
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    k_new: &[f32],
    v_new: &[f32],
    p: &Params,
    pos_offset: usize,
) {
    let (nkv, d, ctx) = (
        p.n_kv_heads as usize,
        p.head_dim as usize,
        p.max_ctx as usize,
    );
    let n_tokens = k_new.len() / (nkv * d);
    for t in 0..n_tokens {
        let pos = pos_offset + t;
        if pos >= ctx {
            continue;
        }
        for h in 0..nkv {
            for j in 0..d {
                let src = t * nkv * d + h * d + j;
                let dst = (h * ctx + pos) * d + j;
                k_cache[dst] = k_new[src];
                v_cache[dst] = v_new[src];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{gpu, gpu_with_split, rand_vec};

    /// Run a sequence of steps on one cache (random initial contents, so
    /// untouched positions are checked too) and compare the whole cache with
    /// the reference after each step. Exact equality: this is a copy.
    /// `check` = apply the host-side step check (off to test the kernel guard).
    fn run(
        gpu: &Gpu,
        nkv: usize,
        d: usize,
        ctx: usize,
        steps: &[(usize, usize)],
        check: bool,
        seed: u64,
    ) {
        let p = Params::new(nkv, d, ctx).unwrap();
        let op = KvCopy::new(gpu).unwrap();
        let cache = KvCache::new(gpu, p).unwrap();
        let n_cache = nkv * ctx * d;
        let mut kc = rand_vec(n_cache, 1.0, seed);
        let mut vc = rand_vec(n_cache, 1.0, seed + 1);
        gpu.queue
            .write_buffer(&cache.k, 0, bytemuck::cast_slice(&kc));
        gpu.queue
            .write_buffer(&cache.v, 0, bytemuck::cast_slice(&vc));
        let max_n = steps.iter().map(|s| s.0).max().unwrap();
        let kb = gpu.storage("k_new", (max_n * nkv * d * 4) as u64);
        let vb = gpu.storage("v_new", (max_n * nkv * d * 4) as u64);
        let stepb = gpu.uniform("step", &Step::new(1, 0)).unwrap();
        let bg = op.bind(gpu, &stepb, &kb, &vb, &cache).unwrap();
        for (i, &(n, off)) in steps.iter().enumerate() {
            let step = Step::new(n as u32, off as u32);
            if check {
                p.check_step(&step).unwrap();
            }
            let kn = rand_vec(n * nkv * d, 5.0, seed + 10 + 2 * i as u64);
            let vn = rand_vec(n * nkv * d, 5.0, seed + 11 + 2 * i as u64);
            gpu.queue.write_buffer(&kb, 0, bytemuck::cast_slice(&kn));
            gpu.queue.write_buffer(&vb, 0, bytemuck::cast_slice(&vn));
            gpu.queue.write_buffer(&stepb, 0, bytemuck::bytes_of(&step));
            let mut enc = gpu.encoder();
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                op.encode(gpu, &mut pass, &bg, &p, n as u32);
            }
            gpu.submit_wait(enc).unwrap();
            reference(&mut kc, &mut vc, &kn, &vn, &p, off);
            let gk = gpu.read_f32(&cache.k, n_cache).unwrap();
            let gv = gpu.read_f32(&cache.v, n_cache).unwrap();
            let what = format!("kv_copy nkv {nkv} d {d} ctx {ctx} step {i} (n {n}, offset {off})");
            assert!(gk == kc, "{what}: K cache differs");
            assert!(gv == vc, "{what}: V cache differs");
        }
    }

    #[test]
    fn appends_at_the_offset_and_leaves_the_rest() {
        let g = gpu();
        // prefill, decode steps, a chunked prefill that fills the cache exactly
        run(g, 2, 64, 20, &[(5, 0), (1, 5), (1, 6), (13, 7)], true, 1);
        run(g, 1, 24, 9, &[(3, 2)], true, 2);
        run(g, 4, 128, 33, &[(1, 0), (7, 26)], true, 3);
    }

    #[test]
    fn kernel_never_writes_past_max_ctx() {
        // The host check would reject this step; the kernel must still not
        // write position ctx (which would land on the next head's position 0).
        run(gpu(), 3, 8, 6, &[(4, 4)], false, 4);
        let p = Params::new(3, 8, 6).unwrap();
        assert!(p.check_step(&Step::new(4, 4)).is_err());
        assert!(p.check_step(&Step::new(2, 4)).is_ok());
    }

    #[test]
    fn works_on_a_2d_grid() {
        // 9 tokens x 2 heads x 40 / 64 = 12 workgroups on a grid capped at 5
        // per dimension: 5 x 3, with 3 overshooting workgroups.
        let mut g = gpu_with_split(1 << 30);
        g.caps.max_workgroups_per_dim = 5;
        run(&g, 2, 40, 16, &[(9, 3)], true, 5);
    }

    #[test]
    fn cache_too_big_for_a_binding_is_an_error() {
        let g = gpu_with_split(4096);
        // 2 x 100 x 8 x 4 = 6400 bytes > 4096
        let p = Params::new(2, 8, 100).unwrap();
        let e = KvCache::new(&g, p).err().expect("must fail").to_string();
        assert!(e.contains("6400") && e.contains("4096"), "{e}");
    }
}
