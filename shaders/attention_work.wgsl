// What the two attention kernels share (attention.wgsl, attention_rows.wgsl;
// prepended after attention_common.wgsl): the q, cache and output bindings
// and which (KV split, token or token block, KV head, query heads) a
// workgroup takes. Each kernel declares HPW (query heads per workgroup) and
// SPLITS.

@group(0) @binding(2) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> k_cache: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> v_cache: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> dst: array<vec4<f32>>;

// Deliberate bug for verify's self-tests (model::Faults): map query head h to
// KV head h % n_kv_heads instead of h / group. Never set in use.
override FAULT_GQA_MODULO: bool = false;
// Below any real score; exp(NEG - finite) is 0.
const NEG: f32 = -3.0e38;

struct Work {
    // false: past the grid's work (the overshoot of a 2D grid).
    ok: bool,
    // KV split.
    sp: u32,
    // Token (attention.wgsl) or token block (attention_rows.wgsl).
    tb: u32,
    kvh: u32,
    // Query head of head slot r < HPW: h0 + r * hstride.
    h0: u32,
    hstride: u32,
}

// Workgroup idx of ntb token blocks x n_kv_heads x head chunks x SPLITS
// (split fastest). Head slot r is query head kvh * group + ch * HPW + r of
// head chunk ch; under the fault the heads h with h % n_kv == kvh instead.
// Everything here is workgroup-uniform.
fn wg_work(idx: u32, ntb: u32) -> Work {
    let group = p.n_heads / p.n_kv_heads;
    let nchunk = group / HPW;
    var w: Work;
    w.ok = idx < ntb * p.n_kv_heads * nchunk * SPLITS;
    w.sp = idx % SPLITS;
    let rest = idx / SPLITS;
    let ch = rest % nchunk;
    w.kvh = (rest / nchunk) % p.n_kv_heads;
    w.tb = rest / nchunk / p.n_kv_heads;
    w.hstride = 1u;
    w.h0 = w.kvh * group + ch * HPW;
    if (FAULT_GQA_MODULO) {
        w.hstride = p.n_kv_heads;
        w.h0 = w.kvh + ch * HPW * p.n_kv_heads;
    }
    return w;
}
